"""Header attributes of a stored DICOM file for the index, and a check that the file is whole.

One pass over the tag/length structure of the file: the file meta, the top-level elements up to the
pixel data (the few attributes the index needs are read, everything else is skipped by its length),
then the pixel data and anything after it, checking that every element fits inside the file. A
truncated transfer is therefore detected, and no pixel value is ever read or decoded. This costs a
fraction of a pydicom parse, which matters per instance in the C-STORE handler.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import uid

from grok_pacs.uids import require_uid

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float Pixel Data
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
TRANSFER_SYNTAX_TAG = 0x00020010
SOURCE_AE_TAG = 0x00020016  # the listener records the calling AE here
MAX_VALUE_READ = 1024  # the attributes read here are short strings
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

#: Top-level attributes the index needs, by tag.
WANTED = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID", 0x00200062: "ImageLaterality",
    0x00200060: "Laterality", 0x00280008: "NumberOfFrames", 0x0008002A: "AcquisitionDateTime",
    0x00080022: "AcquisitionDate", 0x00080032: "AcquisitionTime", 0x00080023: "ContentDate",
    0x00080033: "ContentTime",
}


class IncompleteDatasetError(ValueError):
    """The file ends before its dataset does (a truncated transfer), or it is not DICOM."""


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
    source_ae: str = ""  # SourceApplicationEntityTitle of the file meta: who sent it


def read_header(path: Path) -> Header:
    """The index attributes of the file at `path`; raises IncompleteDatasetError or InvalidUIDError."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(132)[128:] != b"DICM":
            raise IncompleteDatasetError("not a DICOM file (no DICM prefix)")
        meta = _Walker(handle, size, implicit=False, little=True).read_group(
            0x0002, {TRANSFER_SYNTAX_TAG: "ts", SOURCE_AE_TAG: "source_ae"})
        syntax = meta.get("ts", "")
        if not syntax:
            raise IncompleteDatasetError("the file meta has no TransferSyntaxUID")
        if syntax == uid.DeflatedExplicitVRLittleEndian:
            body = _inflate(handle)
            handle, size = io.BytesIO(body), len(body)
        walker = _Walker(handle, size, implicit=syntax == uid.ImplicitVRLittleEndian,
                         little=syntax != uid.ExplicitVRBigEndian)
        values = walker.read_until_pixels(WANTED)
        while handle.tell() < size:
            walker.skip_element()
    return _header(values, syntax, meta.get("source_ae", ""))


def _header(values: dict[str, str], syntax: str, source_ae: str) -> Header:
    laterality = next((values.get(k, "").upper() for k in ("ImageLaterality", "Laterality")
                       if values.get(k, "").upper() in ("R", "L", "B")), "")
    try:
        frames = max(1, int(values.get("NumberOfFrames") or 1))
    except ValueError:
        frames = 1
    acquired = values.get("AcquisitionDateTime", "")
    for date, time_ in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        if not acquired and values.get(date):
            acquired = values[date] + values.get(time_, "")
    return Header(
        study_uid=require_uid(values.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_uid=require_uid(values.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_uid=require_uid(values.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=require_uid(values.get("SOPClassUID"), "SOPClassUID"),
        modality=values.get("Modality", ""), laterality=laterality, frames=frames,
        acquisition_datetime=acquired, transfer_syntax=syntax, source_ae=source_ae,
    )


def _inflate(handle: BinaryIO) -> bytes:
    """The inflated dataset of a deflated file; it must be one complete zlib stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(handle.read())
    except zlib.error as exc:
        raise IncompleteDatasetError(f"deflated dataset is corrupt: {exc}") from exc
    if not inflater.eof:
        raise IncompleteDatasetError("deflated dataset ends before its end of stream")
    return body


class _Walker:
    """Steps over data elements by tag and length, checking each fits inside the file."""

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

    def peek_tag(self) -> int | None:
        """The next tag, or None at the end of the file."""
        position = self.handle.tell()
        if position >= self.size:
            return None
        tag = self._read_tag()
        self.handle.seek(position)
        return tag

    def _skip(self, length: int) -> None:
        end = self.handle.tell() + length
        if end > self.size:
            raise IncompleteDatasetError(f"the dataset is truncated ({end - self.size} bytes missing)")
        self.handle.seek(end)

    def _element_header(self, implicit: bool) -> tuple[int, bytes, int]:
        tag = self._read_tag()
        if implicit:
            return tag, b"", struct.unpack(self.order + "L", self._read(4))[0]
        vr = self._read(2)
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):  # implicit VR inside an explicit dataset (as pydicom)
            self.handle.seek(-2, io.SEEK_CUR)
            return tag, b"", struct.unpack(self.order + "L", self._read(4))[0]
        if vr in _LONG_VRS:
            self._read(2)
            return tag, vr, struct.unpack(self.order + "L", self._read(4))[0]
        return tag, vr, struct.unpack(self.order + "H", self._read(2))[0]

    def skip_element(self, implicit: bool | None = None) -> None:
        implicit = self.implicit if implicit is None else implicit
        self._skip_value(*self._element_header(implicit), implicit)

    def _skip_value(self, tag: int, vr: bytes, length: int, implicit: bool) -> None:
        if length == UNDEFINED_LENGTH:
            # An undefined-length UN holds implicit VR little endian items (PS3.5 §6.2.2).
            self._skip_items(encapsulated=tag in PIXEL_TAGS, implicit=implicit or vr == b"UN")
        else:
            self._skip(length)

    def read_group(self, group: int, wanted: dict[int, str]) -> dict[str, str]:
        """Read the elements of `group` at the current position (the file meta)."""
        values: dict[str, str] = {}
        while (tag := self.peek_tag()) is not None and tag >> 16 == group:
            self._read_value_or_skip(wanted, values)
        return values

    def read_until_pixels(self, wanted: dict[int, str]) -> dict[str, str]:
        """Read the top-level dataset up to the pixel data; raises if the file ends first."""
        values: dict[str, str] = {}
        while (tag := self.peek_tag()) not in PIXEL_TAGS:
            if tag is None:
                raise IncompleteDatasetError("the dataset ends before its pixel data (truncated or no image)")
            self._read_value_or_skip(wanted, values)
        return values

    def _read_value_or_skip(self, wanted: dict[int, str], values: dict[str, str]) -> None:
        tag, vr, length = self._element_header(self.implicit)
        if tag in wanted and length <= MAX_VALUE_READ:
            values[wanted[tag]] = self._read(length).decode("ascii", "replace").strip("\x00 ")
        else:
            self._skip_value(tag, vr, length, self.implicit)

    def _skip_items(self, encapsulated: bool, implicit: bool) -> None:
        """Items until the sequence delimiter; nested datasets are walked element by element."""
        order = "<" if encapsulated else None
        while True:
            item_tag = self._read_tag(order)
            (length,) = struct.unpack((order or self.order) + "L", self._read(4))
            if item_tag == SEQUENCE_DELIMITER:
                return
            if item_tag != ITEM:
                raise IncompleteDatasetError(f"unexpected tag {item_tag:08X} inside a sequence")
            if length != UNDEFINED_LENGTH:
                self._skip(length)
                continue
            while (tag := self.peek_tag()) != ITEM_DELIMITER:
                if tag is None:
                    raise IncompleteDatasetError("the dataset is truncated (inside a sequence item)")
                self.skip_element(implicit)
            self._read(8)
