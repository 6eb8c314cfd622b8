"""Header attributes of a stored DICOM file for the index, and a check that the file is whole.

One pass over the tag/length structure of the file: the file meta, the top-level elements up to the
pixel data (the few attributes the index needs are read, everything else is skipped by its length),
then the pixel data and anything after it, checking that every element fits inside the file. A
truncated transfer is therefore detected, and no pixel value is ever read or decoded. This costs a
fraction of a pydicom parse, which matters per instance in the C-STORE handler.

A peer chooses every length in the file, so the walk is bounded (`Limits`): a deflated dataset is inflated
as it is walked, through a small window (skipped values are inflated and dropped), with a cap on its
inflated size; sequence nesting has a cap on its depth. Over a cap: `DatasetLimitError`.
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
MB = 1024 * 1024
_WINDOW = 64 * 1024  # inflated bytes held at once while walking a deflated dataset
_INPUT_CHUNK = 1024 * 1024  # deflated bytes handed to zlib at once (a copy out of the mapped file)
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


class DatasetLimitError(IncompleteDatasetError):
    """The dataset exceeds one of the `Limits`; `setting` names it (max_inflated_mb, max_sequence_depth)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Limits:
    """What checking one dataset may cost, whatever its lengths say (the listener's settings of the same names)."""

    max_inflated_mb: int = 1024  # inflated size of a Deflated Explicit VR Little Endian dataset
    max_sequence_depth: int = 32  # nesting of undefined-length sequences (each level is a recursion)


DEFAULT_LIMITS = Limits()


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


def read_header(path: Path, limits: Limits = DEFAULT_LIMITS) -> Header:
    """The index attributes of the file at `path`; raises IncompleteDatasetError (DatasetLimitError over
    `limits`) or InvalidUIDError."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 132:
            raise IncompleteDatasetError("not a DICOM file (shorter than the preamble)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _parse(mapped, size, limits)


def _parse(buffer, size: int, limits: Limits) -> Header:
    """Parse the mapped file: preamble, file meta, dataset to the end (pages of skipped values untouched)."""
    if buffer[128:132] != b"DICM":
        raise IncompleteDatasetError("not a DICOM file (no DICM prefix)")
    meta_walker = _Walker(buffer, size, implicit=False, little=True, position=132)
    meta = meta_walker.read_group(0x0002, {TRANSFER_SYNTAX_TAG: "ts", SOURCE_AE_TAG: "source_ae"})
    syntax = meta.get("ts", "")
    if not syntax:
        raise IncompleteDatasetError("the file meta has no TransferSyntaxUID")
    if syntax == uid.DeflatedExplicitVRLittleEndian:
        inflating = _InflatingWalker(buffer, meta_walker.position, size, limits)
        values = inflating.read_until_pixels(WANTED)
        while inflating.peek_tag() is not None:
            inflating.skip_element()
        return _header(values, syntax, meta.get("source_ae", ""))
    walker = _Walker(
        buffer,
        size,
        implicit=syntax == uid.ImplicitVRLittleEndian,
        little=syntax != uid.ExplicitVRBigEndian,
        position=meta_walker.position,
        max_depth=limits.max_sequence_depth,
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


class _Walker:
    """Steps over data elements by tag and length in a buffer, checking each fits inside it."""

    def __init__(self, buffer, size: int, implicit: bool, little: bool, position: int, max_depth: int = 0) -> None:
        self.buffer, self.size, self.implicit, self.position = buffer, size, implicit, position
        self.order = "<" if little else ">"
        self.depth, self.max_depth = 0, max_depth or DEFAULT_LIMITS.max_sequence_depth

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
        """Items until the sequence delimiter; nested datasets are walked element by element (a recursion
        per level: the depth is counted, so that hostile nesting ends here, not in RecursionError)."""
        self.depth += 1
        if self.depth > self.max_depth:
            raise DatasetLimitError(
                "max_sequence_depth", f"sequences nested deeper than max_sequence_depth={self.max_depth}"
            )
        order = "<" if encapsulated else None
        while True:
            item_tag, length = self._tag(order), self._u32(order)
            if item_tag == SEQUENCE_DELIMITER:
                self.depth -= 1
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


class _InflatingWalker(_Walker):
    """A `_Walker` over a Deflated Explicit VR Little Endian dataset, inflated while it is walked.

    `buffer` holds only a window of the inflated bytes from about the current position on (positions are
    relative to it); a value longer than the window is inflated and dropped, never held. Memory is thus
    one window plus one input chunk whatever the dataset inflates to, and the inflated total is capped.
    """

    def __init__(self, source, start: int, end: int, limits: Limits) -> None:
        super().__init__(bytearray(), 0, implicit=False, little=True, position=0, max_depth=limits.max_sequence_depth)
        self.source, self.read_at, self.end = source, start, end
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.inflated, self.limits = 0, limits

    def _need(self, count: int) -> int:
        end = self.position + count
        if end > len(self.buffer):
            del self.buffer[: self.position]  # what was walked over is not needed again
            self.position, end = 0, count
            if count > _WINDOW:  # a value skipped by its length: inflate it without keeping it
                self._drop(count - len(self.buffer))
                self.buffer.clear()
                return 0
            self._fill(end)
            if len(self.buffer) < end:
                raise IncompleteDatasetError(f"the dataset is truncated ({end - len(self.buffer)} bytes missing)")
        start, self.position = self.position, end
        return start

    def peek_tag(self) -> int | None:
        if self.position + 4 > len(self.buffer):
            del self.buffer[: self.position]
            self.position = 0
            self._fill(4)
            if not self.buffer:
                if not self.inflater.eof:
                    raise IncompleteDatasetError("deflated dataset ends before its end of stream")
                return None
            if len(self.buffer) < 4:
                raise IncompleteDatasetError("the dataset is truncated (a partial tag at its end)")
        group, element = struct.unpack_from("<HH", self.buffer, self.position)
        return (group << 16) | element

    def _fill(self, end: int) -> None:
        while len(self.buffer) < end and (more := self._inflate(_WINDOW)):
            self.buffer += more

    def _drop(self, count: int) -> None:
        while count > 0:
            dropped = len(self._inflate(min(count, _INPUT_CHUNK)))
            if not dropped:
                raise IncompleteDatasetError(f"the dataset is truncated ({count} bytes missing)")
            count -= dropped

    def _inflate(self, max_length: int) -> bytes:
        """Up to `max_length` more inflated bytes; b"" at the end of the stream or of the input."""
        while not self.inflater.eof:
            data = self.inflater.unconsumed_tail
            if not data and self.read_at < self.end:
                data = self.source[self.read_at : self.read_at + _INPUT_CHUNK]
                self.read_at += len(data)
            try:
                out = self.inflater.decompress(data, max_length)
            except zlib.error as exc:
                raise IncompleteDatasetError(f"deflated dataset is corrupt: {exc}") from exc
            if out:
                self.inflated += len(out)
                if self.inflated > self.limits.max_inflated_mb * MB:
                    raise DatasetLimitError(
                        "max_inflated_mb",
                        f"deflated dataset inflates past max_inflated_mb={self.limits.max_inflated_mb}",
                    )
                return out
            if not data:  # no input left and nothing pending in zlib
                break
        return b""
