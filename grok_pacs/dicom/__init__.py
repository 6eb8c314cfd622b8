"""DICOM vocabulary and networking primitives: UID grammar (`uids`), the storage SOP classes received
(`sop_classes`), DIMSE status codes (`status`), presentation contexts (`contexts`), header reading without
pixel decoding (`header`), the storage SCU (`scu`) with its TLS client context (`tls`), and the pynetdicom
fast path (`fastpath`, setting `pynetdicom_fast_path`) with its byte-level encoders (`direct_codec`).

The lowest layer beside `config` and `domain`. May import: `grok_pacs.config`, `grok_pacs.domain`.
"""
