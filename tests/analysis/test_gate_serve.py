"""Issue 15's hostile inputs end to end: DCMTK storescu -> `grok-pacs serve` (tiny bundle) -> DCMTK storescp.

Blank, tiny, corrupted (JPEG entropy-coded data overwritten) and heavily blurred images, all made here,
come back as SRs without a diagnosis that give coded reasons and "retake, or refer"; an eye with a good
CFP and an all-zero 16-bit OCT is analysed from the CFP alone and its SR says the OCT was left out.
Every SR passes dciodvfy.
"""

from __future__ import annotations

import numpy as np
import pydicom

from devtools import sample_dicom
from devtools.ports import free_port
from devtools.processes import GrokProcess, grok_env, wait_until
from devtools.storescp import StoreSCP
from grok_pacs.report.codes import GRADABILITY_CODES, LABEL_CODES
from tests.analysis.test_gate import blurred, corrupted_jpeg
from tests.helpers.ingest_support import storescu
from tests.helpers.ophthalmic_dicom import Patient, fundus_pixels, make_cfp, make_oct, write
from tests.helpers.srcheck import assert_valid_sr

RETAKE = "Image quality insufficient: retake, or refer"


def _cfp_with(patient: Patient, eye: str, rgb: np.ndarray):
    ds = make_cfp(patient, eye)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds


def _corrupted_cfp(patient: Patient, eye: str):
    rgb = fundus_pixels(size=768)
    ds = make_cfp(patient, eye)
    ds.Rows, ds.Columns = rgb.shape[:2]
    return sample_dicom.set_jpeg_frame(ds, corrupted_jpeg(rgb))


def _zero_oct_16bit(patient: Patient, eye: str):
    ds = make_oct(patient, eye, volume=np.zeros((6, 96, 96), np.uint8))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = np.zeros((6, 96, 96), np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _diagnosis_codes(sr: pydicom.Dataset) -> set[str]:
    """Code values of every CODE item named Diagnosis, anywhere in the tree."""
    found = set()

    def walk(items):
        for item in items:
            name = item.get("ConceptNameCodeSequence", [None])[0]
            if item.ValueType == "CODE" and name is not None and name.CodeMeaning == "Diagnosis":
                found.add(item.ConceptCodeSequence[0].CodeValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_hostile_inputs_get_no_diagnosis_through_serve(tmp_path, tiny_bundle):
    pacs = StoreSCP(free_port(), tmp_path / "pacs").start()
    port = free_port()
    settings = dict(
        data_dir=tmp_path / "grok",
        bundle=tiny_bundle,
        port=port,
        bind_address="127.0.0.1",
        quiet_period=1,
        destination=f"PACS@127.0.0.1:{pacs.port}",
    )
    serve = GrokProcess(["serve"], grok_env(**settings), tmp_path / "serve.log")
    try:
        serve.wait_ready("worker ready")
        first, second = Patient(patient_id="GATE-1"), Patient(patient_id="GATE-2")
        tiny_oct = make_oct(first, "R", volume=np.zeros((4, 8, 8), np.uint8))
        datasets = [
            _cfp_with(first, "R", np.zeros((256, 256, 3), np.uint8)),
            tiny_oct,  # blank CFP, tiny blank OCT
            _corrupted_cfp(first, "L"),
            _cfp_with(second, "R", blurred(fundus_pixels(), 16)),  # heavily blurred
            make_cfp(second, "L"),
            _zero_oct_16bit(second, "L"),  # good CFP, all-zero 16-bit OCT
        ]
        files = [write(ds, tmp_path / "send" / f"{i}.dcm") for i, ds in enumerate(datasets)]
        # storescu proposes JPEG baseline only when told (-xy), then for every file: the JPEG goes on its own.
        for batch, flags in (([f for f in files if f.name != "2.dcm"], []), ([files[2]], ["-xy"])):
            sent = storescu(port, *batch, options=tuple(flags), calling="MODALITY", timeout=120)
            assert sent.returncode == 0, sent.stderr

        def srs() -> list[pydicom.Dataset]:  # each study also gets its PDF report: count the SRs
            return [ds for ds in pacs.received() if ds.Modality == "SR"]

        wait_until(lambda: len(srs()) >= 4, 240, "four SRs at the PACS", interval=0.5)
        assert len(srs()) == 4
        by_key = {}
        for path in sorted(p for p in pacs.out_dir.iterdir() if p.is_file()):
            sr = pydicom.dcmread(path)
            if sr.Modality != "SR":
                continue
            eye = "R" if "(right eye)" in sr.SeriesDescription else "L"
            by_key[(sr.PatientID, eye)] = (sr, path)
        expected = {
            ("GATE-1", "R"): (
                "Insufficient retinal field coverage",
                "Image below the minimum resolution",
                "Blank OCT frames",
            ),
            ("GATE-1", "L"): ("Pixel data cannot be decoded",),
            ("GATE-2", "R"): ("Image out of focus",),
        }
        for key, reasons in expected.items():
            assert key in by_key, f"no SR for {key}: {sorted(by_key)}"
            sr, path = by_key[key]
            assert _diagnosis_codes(sr) == set(), f"{key} got a diagnosis"
            text = assert_valid_sr(
                path,
                GRADABILITY_CODES["ungradable"].meaning,
                RETAKE,
                *reasons,
                "no diagnosis was made",
                "Patient-level recommendation",
            )
            assert "No diagnosis: the images of this eye are ungradable" in text  # the eye's own impression
            assert "Findings are consistent" not in text  # (the other eye's label may appear at patient level)
        sr, path = by_key[("GATE-2", "L")]
        assert _diagnosis_codes(sr) and _diagnosis_codes(sr) <= {c.value for c in LABEL_CODES.values()}
        assert_valid_sr(path, "Blank OCT frames", "it was left out and the assessment used the remaining modality")
    finally:
        serve.stop()
        pacs.stop()
    assert serve.proc.returncode == 0, serve.log()[-3000:]
