"""The PDF report a clinician reads in any viewer: its text (by extraction, as a reader would copy it), its
embedded fonts, and its DICOM Encapsulated PDF wrapper (dciodvfy clean, same study, own series)."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys

import numpy as np
import pydicom
import pypdf

from grok_pacs.analysis.result import (
    Action,
    Disposition,
    Eye,
    Gradability,
    ModalityQuality,
    NarrativeCheck,
    NarrativeIssue,
    NarrativeReason,
    QualityReason,
)
from grok_pacs.domain.biomarkers import BY_KEY, CFP_BIOMARKERS, format_value
from grok_pacs.domain.labels import Label
from grok_pacs.report.encapsulated import ENCAPSULATED_PDF, build_encapsulated_pdf
from grok_pacs.report.keys import ReportKey, SRKey
from grok_pacs.report.pdf import BANNER, UNIT_TEXT, ReportImages, build_pdf
from grok_pacs.report.sr import build_sr
from grok_pacs.report.study import StudyHeader
from tests.conftest import require_tool
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct
from tests.report.test_sr import _report, _source

REFER = Disposition(Action.REFERRAL, "Refer to ophthalmology (glaucoma suspected)", "RCOphth glaucoma", "glaucoma")
PATIENT_REFER = dataclasses.replace(REFER, eyes=("R",))


def _text(pdf: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    return re.sub(r"\s+", " ", " ".join(page.extract_text() for page in reader.pages))


def _images(seed: int = 0) -> ReportImages:
    rng = np.random.default_rng(seed)
    return ReportImages(
        cfp=rng.integers(0, 255, (300, 400, 3), dtype=np.uint8),
        oct_bscan=rng.integers(0, 255, (128, 256), dtype=np.uint8),
        oct_frames=8,
    )


def _study():
    patient = Patient()
    cfp_r, oct_r, cfp_l = make_cfp(patient, "R"), make_oct(patient, "R"), make_cfp(patient, "L")
    right = _report(Eye.RIGHT, Label.GLAUCOMA, [_source(cfp_r), _source(oct_r, frame=4)])
    high_cdr = tuple(dataclasses.replace(b, value=0.72) if b.key == "cup_to_disc" else b for b in right.biomarkers)
    right = dataclasses.replace(
        right,
        biomarkers=high_cdr,
        label_scores={"Glaucoma": 0.83},
        probabilities_calibrated=True,
        disposition=REFER,
        patient_disposition=PATIENT_REFER,
    )
    left = dataclasses.replace(
        _report(Eye.LEFT, Label.INDETERMINATE, [_source(cfp_l)], markers=(), missing=("OCT",), narrative=""),
        impression="No diagnosis could be determined.",
        gradability=Gradability.UNGRADABLE,
        quality=(ModalityQuality("CFP", Gradability.UNGRADABLE, (QualityReason("blur", "sharpness 0.8 < 2.0"),)),),
        patient_disposition=PATIENT_REFER,
    )
    header = StudyHeader.from_dataset(cfp_r, software="grok-pacs test", made_at="2026-01-01 10:00")
    return patient, (cfp_r, oct_r, cfp_l), {Eye.RIGHT: right, Eye.LEFT: left}, header


def test_pdf_text_has_header_dispositions_diagnosis_and_every_biomarker_with_unit():
    patient, _, reports, header = _study()
    text = _text(build_pdf(header, reports, {Eye.RIGHT: _images(), Eye.LEFT: ReportImages(cfp=_images(1).cfp)}))
    assert BANNER in text
    assert f"ID {patient.patient_id}" in text and "Test Retina" in text and patient.study_uid in text
    assert "GROK tiny 0.1.0" in text
    assert "Patient-level disposition Refer to ophthalmology (glaucoma suspected)" in text
    assert "Glaucoma (calibrated probability 0.83)" in text
    assert "OCT B-scan used: frame 4 of 8 (fovea selection)" in text
    assert reports[Eye.RIGHT].narrative in text
    for est in reports[Eye.RIGHT].biomarkers:
        marker = BY_KEY[est.key]
        assert f"{marker.name} {format_value(marker, est.value)} {UNIT_TEXT[marker.unit]}" in text, marker.name
    # Out of range: said in words (bold and boxed too), so a greyscale print shows it.
    assert "cup-to-disc ratio 0.720 no unit 0.200 - 0.500 HIGH *" in text
    assert "arteriolar-to-venular ratio (AVR) 0.775 no unit 0.650 - 0.900 Left" not in text
    # The ungradable eye: what was not done, and why.
    assert "No diagnosis: the images of this eye are ungradable." in text
    assert "the language model was not run" in text and "blur (sharpness 0.8 < 2.0)" in text
    assert "Colour fundus photograph" in text and "OCT: not available" in text


def test_pdf_embeds_its_fonts():
    _, _, reports, header = _study()
    reader = pypdf.PdfReader(io.BytesIO(build_pdf(header, reports, {})))
    fonts = {}
    for page in reader.pages:
        for font in page["/Resources"]["/Font"].values():
            font = font.get_object()
            descriptor = (
                font["/DescendantFonts"][0].get_object()["/FontDescriptor"]
                if "/DescendantFonts" in font
                else font.get("/FontDescriptor")
            )
            fonts[str(font["/BaseFont"])] = descriptor is not None and "/FontFile2" in descriptor.get_object()
    assert fonts and all(fonts.values()), fonts


def test_withheld_narrative_is_stated_not_shown():
    _, _, reports, header = _study()
    check = NarrativeCheck(
        passed=False,
        issues=(NarrativeIssue(NarrativeReason.REPEATED_PHRASE, "'the the the'"),),
        words=40,
        repeated_sentences=0,
        distinct_2=0.1,
    )
    right = dataclasses.replace(reports[Eye.RIGHT], narrative="", narrative_check=check)
    text = _text(build_pdf(header, {Eye.RIGHT: right}, {}))
    assert "The model's findings text failed validation and is not shown" in text
    assert "a phrase is repeated over and over: 'the the the'" in text
    assert reports[Eye.RIGHT].narrative not in text
    assert "Glaucoma (calibrated probability 0.83)" in text


def test_encapsulated_pdf_is_valid_in_the_same_study_in_its_own_series(tmp_path):
    patient, (cfp_r, oct_r, cfp_l), reports, header = _study()
    pdf = build_pdf(header, reports, {Eye.RIGHT: _images()})
    key = ReportKey(patient.study_uid, 1, "0.1.0")
    sources = [s for r in reports.values() for s in r.sources]
    path = tmp_path / "report.dcm"
    build_encapsulated_pdf(pdf, cfp_r, sources, key, software_version="test").save_as(path, enforce_file_format=True)
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("Error", "Warning"))]
    assert errors == [], errors
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ENCAPSULATED_PDF and ds.Modality == "DOC"
    assert ds.SOPInstanceUID == key.sop_instance_uid == ReportKey(patient.study_uid, 1, "0.1.0").sop_instance_uid
    assert ds.SOPInstanceUID not in {SRKey(patient.study_uid, 1, "0.1.0", eye).sop_instance_uid for eye in Eye}
    assert ds.StudyInstanceUID == patient.study_uid and ds.PatientID == patient.patient_id
    assert ds.SeriesInstanceUID not in {SRKey(patient.study_uid, 1, "0.1.0", eye).series_uid for eye in Eye}
    assert ds.SeriesDate and "UNVERIFIED" in ds.DocumentTitle and ds.VerificationFlag == "UNVERIFIED"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert {i.ReferencedSOPInstanceUID for i in ds.SourceInstanceSequence} == {
        cfp_r.SOPInstanceUID,
        oct_r.SOPInstanceUID,
        cfp_l.SOPInstanceUID,
    }
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf
    assert "cup-to-disc ratio" in _text(pdf) and len(CFP_BIOMARKERS) == 6


def test_report_command_prints_the_sr_then_the_pdf_path_and_text(tmp_path):
    patient, (cfp_r, oct_r, cfp_l), reports, header = _study()
    folder = tmp_path / "sr" / patient.study_uid
    folder.mkdir(parents=True)
    sr_path = folder / "sr.dcm"
    build_sr(reports[Eye.RIGHT], [cfp_r, oct_r], SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)).save_as(
        sr_path, enforce_file_format=True
    )
    pdf_path = folder / "pdf.dcm"
    sources = [s for r in reports.values() for s in r.sources]
    build_encapsulated_pdf(
        build_pdf(header, reports, {}),
        cfp_r,
        sources,
        ReportKey(patient.study_uid, 1, "0.1.0"),
        software_version="test",
    ).save_as(pdf_path, enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")  # something else in the folder is not a report
    for target in (sr_path, pdf_path):
        proc = subprocess.run(
            [sys.executable, "-m", "grok_pacs.cli", "report", str(target)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        out = re.sub(r"\s+", " ", proc.stdout)
        assert f"PDF report: {pdf_path}" in out
        assert "Refer to ophthalmology (glaucoma suspected)" in out and "Glaucoma (calibrated probability 0.83)" in out
        assert ("Diagnosis: Glaucoma (23986001, SCT)" in out) == (target == sr_path)  # the SR tree, for an SR
