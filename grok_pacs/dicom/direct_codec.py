"""Byte-level encoders the pynetdicom fast path (`grok_pacs.dicom.fastpath`) uses instead of building a
pydicom dataset per message: the command set of a plain C-STORE response, and the file meta of a received
dataset (with the calling AE as SourceApplicationEntityTitle).
"""

from __future__ import annotations

import struct
import threading
from typing import NamedTuple

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import dimse_messages as _dimse_messages

_original_write_file_meta_info = _dimse_messages.write_file_meta_info


class FileMeta(NamedTuple):
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    source_ae: str


def create_file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax, **_ignored) -> FileMeta:
    """What pynetdicom's receive path asks for, without building a pydicom dataset per instance."""
    assoc = getattr(threading.current_thread(), "assoc", None)  # the receiving DUL thread
    calling = str(getattr(getattr(assoc, "requestor", None), "ae_title", "") or "").strip()
    return FileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax), calling)


def _ascii(value: str) -> bytes:
    return value.encode("ascii", "replace")


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes = b"\0") -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def write_file_meta_info(fp, file_meta, enforce_standard: bool = True) -> None:
    """The file meta (explicit VR little endian) of a received dataset, plus the calling AE as
    SourceApplicationEntityTitle so that the stored file records who sent it."""
    if not isinstance(file_meta, FileMeta):
        _original_write_file_meta_info(fp, file_meta, enforce_standard)
        return
    text = _ascii
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", text(file_meta.sop_class_uid)),
            _meta_element(0x0003, b"UI", text(file_meta.sop_instance_uid)),
            _meta_element(0x0010, b"UI", text(file_meta.transfer_syntax)),
            _meta_element(0x0012, b"UI", text(PYNETDICOM_IMPLEMENTATION_UID)),
            _meta_element(0x0013, b"SH", text(PYNETDICOM_IMPLEMENTATION_VERSION), b" "),
            *([_meta_element(0x0016, b"AE", text(file_meta.source_ae), b" ")] if file_meta.source_ae else []),
        )
    )
    fp.write(_meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body)


_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101


def _command_element(element: int, value: bytes) -> bytes:
    """One implicit VR little endian command element of group 0000."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: object) -> bytes:
    data = _ascii(str(value))
    return data + b"\0" if len(data) % 2 else data


def encode_store_response(primitive) -> bytes | None:
    """The command set of a plain C-STORE-RSP (status only), or None when it carries more."""
    if (
        primitive.MessageIDBeingRespondedTo is None
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
        or primitive.Status is None
    ):
        return None
    body = b"".join(
        (
            _command_element(0x0002, _uid(primitive.AffectedSOPClassUID)),
            _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _command_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
            _command_element(0x0800, struct.pack("<H", _NO_DATASET)),
            _command_element(0x0900, struct.pack("<H", primitive.Status)),
            _command_element(0x1000, _uid(primitive.AffectedSOPInstanceUID)),
        )
    )
    return _command_element(0x0000, struct.pack("<L", len(body))) + body
