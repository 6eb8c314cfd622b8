"""Header attributes of a stored DICOM file for the index, and a check that the file is whole.

Reads only the header (pydicom `stop_before_pixels`), then walks the tag/length structure of the pixel
data and anything after it without reading pixel values, so a truncated transfer is detected at the
cost of a few small reads. Pixels are never decoded.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread, uid
from pydicom.errors import InvalidDicomError

from grok_pacs.uids import require_uid

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float Pixel Data
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class IncompleteDatasetError(ValueError):
    """The file ends before its dataset does (a truncated transfer) or is not DICOM."""


@dataclass(frozen=True)
class Header:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    laterality: str
    frames: int
    acquisition_datetime: str
    transfer_syntax: str


def read_header(path: Path) -> Header:
    """The index attributes of the file at `path`; raises IncompleteDatasetError or InvalidUIDError."""
    with open(path, "rb") as handle:
        try:
            ds = dcmread(handle, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, struct.error, ValueError) as exc:
            raise IncompleteDatasetError(f"not a readable DICOM file: {exc}") from exc
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if syntax == uid.DeflatedExplicitVRLittleEndian:
            _check_deflated(handle, ds)
        else:
            _check_complete(handle, syntax)
    return Header(
        study_uid=require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_uid=require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_uid=require_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=require_uid(ds.get("SOPClassUID"), "SOPClassUID"),
        modality=str(ds.get("Modality", "") or ""),
        laterality=_laterality(ds),
        frames=_frames(ds),
        acquisition_datetime=_acquisition_datetime(ds),
        transfer_syntax=syntax,
    )


def _laterality(ds) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("R", "L", "B"):
            return value
    return ""


def _frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _acquisition_datetime(ds) -> str:
    value = str(ds.get("AcquisitionDateTime", "") or "")
    if value:
        return value
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        date = str(ds.get(date_kw, "") or "")
        if date:
            return date + str(ds.get(time_kw, "") or "")
    return ""


def _check_complete(handle: BinaryIO, syntax: str) -> None:
    """After a stop_before_pixels read, the file must continue with pixel data that fits exactly."""
    start = handle.tell()
    size = handle.seek(0, 2)
    handle.seek(start)
    walker = _Walker(handle, size, implicit=syntax == uid.ImplicitVRLittleEndian,
                     little=syntax != uid.ExplicitVRBigEndian)
    tag = walker.peek_tag()
    if tag not in PIXEL_TAGS:
        raise IncompleteDatasetError("the dataset ends before its pixel data (truncated or no image)")
    while handle.tell() < size:
        walker.skip_element()


def _check_deflated(handle: BinaryIO, ds) -> None:
    """A deflated body must be a complete zlib stream (pydicom inflated it already)."""
    meta_length = int(ds.file_meta.get("FileMetaInformationGroupLength", 0))
    handle.seek(132 + 12 + meta_length)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while chunk := handle.read(1 << 20):
            inflater.decompress(chunk, 0)
    except zlib.error as exc:
        raise IncompleteDatasetError(f"deflated dataset is corrupt: {exc}") from exc
    if not inflater.eof:
        raise IncompleteDatasetError("deflated dataset ends before its end of stream")


class _Walker:
    """Skips whole data elements by their tag and length, checking each fits inside the file."""

    def __init__(self, handle: BinaryIO, size: int, implicit: bool, little: bool) -> None:
        self.handle, self.size, self.implicit = handle, size, implicit
        self.order = "<" if little else ">"

    def _read(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) != count:
            raise IncompleteDatasetError("the dataset is truncated (file ends inside an element)")
        return data

    def _read_tag(self, order: str | None = None) -> int:
        group, element = struct.unpack((order or self.order) + "HH", self._read(4))
        return (group << 16) | element

    def peek_tag(self) -> int:
        position = self.handle.tell()
        tag = self._read_tag()
        self.handle.seek(position)
        return tag

    def _skip(self, length: int) -> None:
        end = self.handle.tell() + length
        if end > self.size:
            raise IncompleteDatasetError(f"the dataset is truncated ({end - self.size} bytes missing)")
        self.handle.seek(end)

    def skip_element(self) -> None:
        tag = self._read_tag()
        if self.implicit:
            (length,) = struct.unpack(self.order + "L", self._read(4))
        else:
            vr = self._read(2)
            if vr in _LONG_VRS:
                self._read(2)
                (length,) = struct.unpack(self.order + "L", self._read(4))
            else:
                (length,) = struct.unpack(self.order + "H", self._read(2))
        if length == UNDEFINED_LENGTH:
            self._skip_items(tag)
        else:
            self._skip(length)

    def _skip_items(self, tag: int) -> None:
        """Items until the sequence delimiter; nested datasets are walked element by element."""
        encapsulated = tag in PIXEL_TAGS
        while True:
            item_tag = self._read_tag("<" if encapsulated else None)
            (length,) = struct.unpack(("<" if encapsulated else self.order) + "L", self._read(4))
            if item_tag == SEQUENCE_DELIMITER:
                return
            if item_tag != ITEM:
                raise IncompleteDatasetError(f"unexpected tag {item_tag:08X} inside a sequence")
            if length != UNDEFINED_LENGTH:
                self._skip(length)
                continue
            while self.peek_tag() != ITEM_DELIMITER:
                self.skip_element()
            self._read(8)
