"""Hostile datasets: a deflate bomb, hostile sequence nesting, a SOP class sent over another class's context.

The header check (grok_pacs.dicom.header) alone, then real associations over loopback to a real listener
(fast path and pynetdicom as released): each is refused with its status and ErrorComment, nothing is
stored, no temporary file is left, and the association goes on.
"""

from __future__ import annotations

import re
import struct
import tracemalloc
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config

from devtools.sample_dicom import fundus_photograph, write
from grok_pacs.dicom.header import DatasetLimitError, IncompleteDatasetError, Limits, read_header
from grok_pacs.dicom.sop_classes import OP_8BIT
from grok_pacs.dicom.status import DimseStatus
from tests.helpers.ingest_support import AE as OUR_AE
from tests.helpers.ingest_support import ingest_settings, running, stored_files, temp_files

MB = 1024 * 1024
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_LONG_VRS = (b"OB", b"SQ", b"UN")


# --- crafting files byte by byte (pydicom would hold the inflated bomb, or recurse on the nesting) -------------
def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _nesting(depth: int) -> bytes:
    """Content Sequence (0040,A730) nested `depth` deep, every sequence and item of undefined length."""
    opening = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def _craft(
    path: Path, syntax: str, pixel_mb: int = 0, depth: int = 0, sop_class: str = OP_8BIT, meta_class: str = ""
) -> Path:
    """An OP instance: UIDs, optionally nested sequences, then `pixel_mb` MB of zero pixel bytes (OB). The
    file meta names `meta_class` (the sender's AffectedSOPClassUID) if given, else `sop_class`."""
    sop_uid, study, series = generate_uid(), generate_uid(), generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = meta_class or sop_class, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = syntax, PYDICOM_IMPLEMENTATION_UID
    meta_bytes = DicomBytesIO()
    write_file_meta_info(meta_bytes, meta, enforce_standard=True)
    head = b"".join(
        [
            _element(0x00080016, b"UI", _text(sop_class, b"\0")),
            _element(0x00080018, b"UI", _text(sop_uid, b"\0")),
            _element(0x00080060, b"CS", b"OP"),
            _element(0x0020000D, b"UI", _text(study, b"\0")),
            _element(0x0020000E, b"UI", _text(series, b"\0")),
            _nesting(depth),
            struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, max(2, pixel_mb * MB)),
        ]
    )
    zeros = bytes(MB)
    body = [head, *([zeros] * pixel_mb)] if pixel_mb else [head, b"\0\0"]
    _write(path, b"\0" * 128 + b"DICM" + meta_bytes.getvalue(), body, deflate=syntax == DeflatedExplicitVRLittleEndian)
    return path


def _write(path: Path, preamble_and_meta: bytes, body: Iterable[bytes], deflate: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS) if deflate else None
    with open(path, "wb") as handle:
        handle.write(preamble_and_meta)
        for part in body:
            handle.write(deflater.compress(part) if deflater else part)
        if deflater:
            handle.write(deflater.flush())


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 MB of zero pixel bytes, deflated: about 200 KB in the file."""
    path = _craft(tmp_path_factory.mktemp("bomb") / "bomb.dcm", DeflatedExplicitVRLittleEndian, pixel_mb=200)
    assert path.stat().st_size < 1 * MB
    return path


# --- the header check alone ------------------------------------------------------------------------------------
def test_deflated_dataset_is_inflated_through_a_window_and_capped(tmp_path: Path) -> None:
    path = _craft(tmp_path / "zeros.dcm", DeflatedExplicitVRLittleEndian, pixel_mb=32)
    tracemalloc.start()
    try:
        header = read_header(path)  # the default cap: a 32 MB dataset is fine
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.sop_class_uid == OP_8BIT and header.transfer_syntax == DeflatedExplicitVRLittleEndian
    assert peak < 4 * MB, f"inflating 32 MB held {peak} bytes at once"
    assert read_header(path, Limits(max_inflated_mb=33)).sop_uid == header.sop_uid  # under the cap: fine
    with pytest.raises(DatasetLimitError, match=r"max_inflated_mb=8\b") as refused:
        read_header(path, Limits(max_inflated_mb=8))
    assert refused.value.setting == "max_inflated_mb"


def test_deflated_stream_cut_short_is_incomplete_not_a_limit(tmp_path: Path) -> None:
    path = _craft(tmp_path / "cut.dcm", DeflatedExplicitVRLittleEndian, pixel_mb=4)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(IncompleteDatasetError) as refused:
        read_header(path)
    assert not isinstance(refused.value, DatasetLimitError)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_sequence_nesting_is_capped_without_recursion_error(tmp_path: Path, syntax: str) -> None:
    fine = _craft(tmp_path / "fine.dcm", syntax, depth=8)
    assert read_header(fine).modality == "OP"
    deep = _craft(tmp_path / "deep.dcm", syntax, depth=10_000)
    with pytest.raises(DatasetLimitError, match=r"max_sequence_depth=32\b") as refused:
        read_header(deep)
    assert refused.value.setting == "max_sequence_depth"
    with pytest.raises(DatasetLimitError, match=r"max_sequence_depth=4\b"):
        read_header(fine, Limits(max_sequence_depth=4))
    assert read_header(fine, Limits(max_sequence_depth=8)).modality == "OP"


# --- against a real listener ----------------------------------------------------------------------------------
@contextmanager
def _association(port: int, contexts: list[tuple[str, str]]) -> Iterator:
    """An association proposing one context per (SOP class, transfer syntax); files are sent as they are."""
    ae = AE(ae_title="HOSTILE")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    was_chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE)
    try:
        assert assoc.is_established
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = was_chunked


def _answer(response) -> tuple[int, str]:
    return int(response.Status), str(response.get("ErrorComment", ""))


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def test_deflate_bomb_refused_without_memory_growth_then_next_instances_stored(
    tmp_path: Path, fast_path: bool, bomb: Path
) -> None:
    settings = ingest_settings(tmp_path, pynetdicom_fast_path=fast_path, max_inflated_mb=64)
    small_deflated = _craft(tmp_path / "small.dcm", DeflatedExplicitVRLittleEndian, pixel_mb=1)
    photo = write(fundus_photograph(generate_uid(), "R", size=32), tmp_path / "photo.dcm")
    contexts = [(OP_8BIT, DeflatedExplicitVRLittleEndian), (OP_8BIT, JPEGBaseline8Bit)]
    with running(settings) as service, _association(service.port, contexts) as assoc:
        before = _rss_kib("VmRSS")
        _peak_rss_reset()
        status, comment = _answer(assoc.send_c_store(bomb))  # listener and sender share this process
        grown_mb = (_rss_kib("VmHWM") - before) / 1024
        after_bomb = stored_files(settings), temp_files(settings)
        answers = [_answer(assoc.send_c_store(path)) for path in (small_deflated, photo)]
    assert status == DimseStatus.ERROR_DATASET_LIMIT and comment == "deflated dataset inflates past max_inflated_mb=64"
    assert grown_mb < 32, f"the listener grew by {grown_mb:.0f} MB checking a 200 MB deflate bomb"
    assert after_bomb == ([], [])
    assert answers == [(DimseStatus.SUCCESS, "")] * 2
    assert sorted(p.name for p in stored_files(settings)) == sorted(
        f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm" for p in (small_deflated, photo)
    )
    assert temp_files(settings) == []


def test_hostile_sequence_nesting_refused_and_association_goes_on(tmp_path: Path, fast_path: bool) -> None:
    settings = ingest_settings(tmp_path, pynetdicom_fast_path=fast_path)
    deep = _craft(tmp_path / "deep.dcm", ExplicitVRLittleEndian, depth=10_000)
    fine = _craft(tmp_path / "fine.dcm", ExplicitVRLittleEndian, depth=3)
    with running(settings) as service, _association(service.port, [(OP_8BIT, ExplicitVRLittleEndian)]) as assoc:
        refused = _answer(assoc.send_c_store(deep))
        assert stored_files(settings) == [] and temp_files(settings) == []
        stored = _answer(assoc.send_c_store(fine))
    assert refused == (DimseStatus.ERROR_DATASET_LIMIT, "sequences nested deeper than max_sequence_depth=32")
    assert stored == (DimseStatus.SUCCESS, "") and len(stored_files(settings)) == 1


def test_sop_class_must_match_its_presentation_context(tmp_path: Path, fast_path: bool) -> None:
    settings = ingest_settings(tmp_path, pynetdicom_fast_path=fast_path)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    # The request says OP (the context's class), the dataset inside is a CT.
    ct_as_op = _craft(tmp_path / "ct_as_op.dcm", ExplicitVRLittleEndian, sop_class=CT_IMAGE, meta_class=OP_8BIT)
    photo = write(fundus_photograph(generate_uid(), "L", size=32), tmp_path / "photo.dcm")
    contexts = [(OP_8BIT, ExplicitVRLittleEndian), (OP_8BIT, JPEGBaseline8Bit)]
    with running(settings) as service, _association(service.port, contexts) as assoc:
        [op_context] = [cx for cx in assoc.accepted_contexts if cx.transfer_syntax[0] == ExplicitVRLittleEndian]
        # A CT request (AffectedSOPClassUID CT) sent over the OP context, as a hostile sender could.
        assoc._get_valid_context = lambda *args, **kwargs: op_context
        over_op = _answer(assoc.send_c_store(ct))
        del assoc._get_valid_context
        mismatched = _answer(assoc.send_c_store(ct_as_op))
        good = _answer(assoc.send_c_store(photo))
    assert over_op[0] == DimseStatus.SOP_CLASS_NOT_SUPPORTED
    assert over_op[1].startswith(f"SOP class '{CT_IMAGE}' is not its context's")
    assert mismatched == (
        DimseStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "dataset SOPClassUID differs from the request's",
    )
    assert good == (DimseStatus.SUCCESS, "")
    assert [p.name for p in stored_files(settings)] == [f"{pydicom.dcmread(photo).SOPInstanceUID}.dcm"]
    assert temp_files(settings) == []


def test_dataset_limit_status_is_a_permanent_failure() -> None:
    from grok_pacs.dicom.status import StatusCategory, category, status_name

    assert status_name(0xC004) == "ERROR_DATASET_LIMIT" and category(0xC004) is StatusCategory.PERMANENT
