"""Header attributes of a stored DICOM file for the index, and a check that the file is whole.

One pass over the tag/length structure of the file: the file meta, the top-level elements up to the
pixel data (the few attributes the index needs are read, everything else is skipped by its length),
then the pixel data and anything after it, checking that every element fits inside the file. A
truncated transfer is therefore detected, and no pixel value is ever read or decoded. This costs a
fraction of a pydicom parse, which matters per instance in the C-STORE handler.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import uid

from grok_pacs.dicom.uids import require_uid

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float Pixel Data
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
TRANSFER_SYNTAX_TAG = 0x00020010
SOURCE_AE_TAG = 0x00020016  # the listener records the calling AE here
MAX_VALUE_READ = 1024  # the attributes read here are short strings
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

#: Top-level attributes the index needs, by tag.
WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200062: "ImageLaterality",
    0x00200060: "Laterality",
    0x00280008: "NumberOfFrames",
    0x0008002A: "AcquisitionDateTime",
    0x00080022: "AcquisitionDate",
    0x00080032: "AcquisitionTime",
    0x00080023: "ContentDate",
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
        if size < 132:
            raise IncompleteDatasetError("not a DICOM file (shorter than the preamble)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _parse(mapped, size)


def _parse(buffer, size: int) -> Header:
    """Parse the mapped file: preamble, file meta, dataset to the end (pages of skipped values untouched)."""
    if buffer[128:132] != b"DICM":
        raise IncompleteDatasetError("not a DICOM file (no DICM prefix)")
    meta_walker = _Walker(buffer, size, implicit=False, little=True, position=132)
    meta = meta_walker.read_group(0x0002, {TRANSFER_SYNTAX_TAG: "ts", SOURCE_AE_TAG: "source_ae"})
    syntax = meta.get("ts", "")
    if not syntax:
        raise IncompleteDatasetError("the file meta has no TransferSyntaxUID")
    position = meta_walker.position
    if syntax == uid.DeflatedExplicitVRLittleEndian:
        buffer = _inflate(buffer[position:])
        size, position = len(buffer), 0
    walker = _Walker(
        buffer,
        size,
        implicit=syntax == uid.ImplicitVRLittleEndian,
        little=syntax != uid.ExplicitVRBigEndian,
        position=position,
    )
    values = walker.read_until_pixels(WANTED)
    while walker.position < size:
        walker.skip_element()
    return _header(values, syntax, meta.get("source_ae", ""))


def _header(values: dict[str, str], syntax: str, source_ae: str) -> Header:
    laterality = next(
        (
            values.get(k, "").upper()
            for k in ("ImageLaterality", "Laterality")
            if values.get(k, "").upper() in ("R", "L", "B")
        ),
        "",
    )
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
        modality=values.get("Modality", ""),
        laterality=laterality,
        frames=frames,
        acquisition_datetime=acquired,
        transfer_syntax=syntax,
        source_ae=source_ae,
    )


def _inflate(data: bytes) -> bytes:
    """The inflated dataset of a deflated file; it must be one complete zlib stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data)
    except zlib.error as exc:
        raise IncompleteDatasetError(f"deflated dataset is corrupt: {exc}") from exc
    if not inflater.eof:
        raise IncompleteDatasetError("deflated dataset ends before its end of stream")
    return body


class _Walker:
    """Steps over data elements by tag and length in a buffer, checking each fits inside it."""

    def __init__(self, buffer, size: int, implicit: bool, little: bool, position: int) -> None:
        self.buffer, self.size, self.implicit, self.position = buffer, size, implicit, position
        self.order = "<" if little else ">"

    def _need(self, count: int) -> int:
        """Advance over `count` bytes; returns where they start."""
        start = self.position
        if start + count > self.size:
            raise IncompleteDatasetError(f"the dataset is truncated ({start + count - self.size} bytes missing)")
        self.position = start + count
        return start

    def _tag(self, order: str | None = None) -> int:
        group, element = struct.unpack_from((order or self.order) + "HH", self.buffer, self._need(4))
        return (group << 16) | element

    def _u32(self, order: str | None = None) -> int:
        return struct.unpack_from((order or self.order) + "L", self.buffer, self._need(4))[0]

    def peek_tag(self) -> int | None:
        """The next tag, or None at the end of the data."""
        if self.position + 4 > self.size:
            return None if self.position >= self.size else self._tag()  # a partial tag raises
        group, element = struct.unpack_from(self.order + "HH", self.buffer, self.position)
        return (group << 16) | element

    def _element_header(self, implicit: bool) -> tuple[int, bytes, int]:
        tag = self._tag()
        if implicit:
            return tag, b"", self._u32()
        start = self._need(2)
        vr = bytes(self.buffer[start : start + 2])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):  # implicit VR inside an explicit dataset (as pydicom)
            self.position = start
            return tag, b"", self._u32()
        if vr in _LONG_VRS:
            self._need(2)
            return tag, vr, self._u32()
        return tag, vr, struct.unpack_from(self.order + "H", self.buffer, self._need(2))[0]

    def skip_element(self, implicit: bool | None = None) -> None:
        implicit = self.implicit if implicit is None else implicit
        self._skip_value(*self._element_header(implicit), implicit)

    def _skip_value(self, tag: int, vr: bytes, length: int, implicit: bool) -> None:
        if length == UNDEFINED_LENGTH:
            # An undefined-length UN holds implicit VR little endian items (PS3.5 §6.2.2).
            self._skip_items(encapsulated=tag in PIXEL_TAGS, implicit=implicit or vr == b"UN")
        else:
            self._need(length)

    def read_group(self, group: int, wanted: dict[int, str]) -> dict[str, str]:
        """Read the elements of `group` at the current position (the file meta)."""
        values: dict[str, str] = {}
        while (tag := self.peek_tag()) is not None and tag >> 16 == group:
            self._read_value_or_skip(wanted, values)
        return values

    def read_until_pixels(self, wanted: dict[int, str]) -> dict[str, str]:
        """Read the top-level dataset up to the pixel data; raises if the data ends first."""
        values: dict[str, str] = {}
        while (tag := self.peek_tag()) not in PIXEL_TAGS:
            if tag is None:
                raise IncompleteDatasetError("the dataset ends before its pixel data (truncated or no image)")
            self._read_value_or_skip(wanted, values)
        return values

    def _read_value_or_skip(self, wanted: dict[int, str], values: dict[str, str]) -> None:
        tag, vr, length = self._element_header(self.implicit)
        if tag in wanted and length <= MAX_VALUE_READ:
            start = self._need(length)
            values[wanted[tag]] = bytes(self.buffer[start : start + length]).decode("ascii", "replace").strip("\x00 ")
        else:
            self._skip_value(tag, vr, length, self.implicit)

    def _skip_items(self, encapsulated: bool, implicit: bool) -> None:
        """Items until the sequence delimiter; nested datasets are walked element by element."""
        order = "<" if encapsulated else None
        while True:
            item_tag, length = self._tag(order), self._u32(order)
            if item_tag == SEQUENCE_DELIMITER:
                return
            if item_tag != ITEM:
                raise IncompleteDatasetError(f"unexpected tag {item_tag:08X} inside a sequence")
            if length != UNDEFINED_LENGTH:
                self._need(length)
                continue
            while (tag := self.peek_tag()) != ITEM_DELIMITER:
                if tag is None:
                    raise IncompleteDatasetError("the dataset is truncated (inside a sequence item)")
                self.skip_element(implicit)
            self._need(8)
