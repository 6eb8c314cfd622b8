"""DICOM vocabulary and networking primitives: UID grammar (`uids`), DIMSE status codes (`status`),
presentation contexts (`contexts`), header reading without pixel decoding (`header`), the storage SCU
(`scu`) and the pynetdicom receive fast path (`fastpath`).

The lowest layer beside `config` and `domain`: may import only those two.
"""
