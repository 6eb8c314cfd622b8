"""The SR builder: every SR passes dciodvfy and renders in DCMTK; inputs are validated; UIDs are stable."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from grok_pacs.analysis.result import BiomarkerEstimate, Eye, Report, SourceImage
from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, CFP_BIOMARKERS
from grok_pacs.domain.labels import Label
from grok_pacs.report import codes
from grok_pacs.report.render import render
from grok_pacs.report.sr import AI_STATEMENT, SRBuildError, SRKey, build_sr
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct
from tests.helpers.srcheck import assert_valid_sr

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _source(ds, frame=None) -> SourceImage:
    return SourceImage(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), frame)


def _report(eye: Eye, label: Label, sources, *, markers=BIOMARKERS, missing=(), narrative=None) -> Report:
    estimates = tuple(BiomarkerEstimate(b.key, (b.normal[0] + b.normal[1]) / 2, b.unit) for b in markers)
    return Report(
        eye=eye,
        label=label,
        narrative=narrative
        if narrative is not None
        else f"The cup-to-disc ratio is 0.45 and the RNFL averages 30.0 um in the {eye.name.lower()} eye.",
        impression=f"Findings are consistent with {label.value}.",
        raw_text="raw generation",
        biomarkers=estimates,
        cited_numbers=(),
        label_scores={},
        missing_modalities=tuple(missing),
        sources=tuple(sources),
        oct_frame_index=3 if "OCT" not in missing else None,
        oct_frame_method="fovea" if "OCT" not in missing else None,
        bundle_name="tiny",
        bundle_version="0.1.0",
    )


@pytest.fixture
def study():
    patient = Patient()
    return patient, make_cfp(patient, "R"), make_oct(patient, "R")


def _save(sr, tmp_path: Path, name: str = "sr.dcm") -> Path:
    path = tmp_path / name
    sr.save_as(path, enforce_file_format=True)
    return path


def test_cfp_and_oct_report_is_valid_and_renders(study, tmp_path):
    patient, cfp, oct_ds = study
    report = _report(Eye.RIGHT, Label.GLAUCOMA, [_source(cfp), _source(oct_ds, frame=4)])
    key = SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)
    path = _save(build_sr(report, [cfp, oct_ds], key), tmp_path)
    rendered = assert_valid_sr(
        path, codes.LABEL_CODES[Label.GLAUCOMA].meaning, report.narrative, report.impression, AI_STATEMENT
    )
    assert "Retina" in rendered and "Right" in rendered
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == COMPREHENSIVE_SR
    assert ds.SOPInstanceUID == key.sop_instance_uid
    assert (ds.VerificationFlag, ds.PreliminaryFlag, ds.CompletionFlag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")
    # Files into the same study of the same patient.
    for name in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyDate",
        "StudyID",
    ):
        assert ds.get(name) == cfp.get(name), name
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {
        ref.ReferencedSOPInstanceUID
        for item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {cfp.SOPInstanceUID, oct_ds.SOPInstanceUID}
    equipment = {item.Manufacturer for item in ds.ContributingEquipmentSequence}
    assert "grok-pacs" in equipment
    assert "written as the measurements" not in rendered  # nothing was rewritten in this report


def test_rewritten_numbers_are_disclosed_to_the_reader(study, tmp_path):
    patient, cfp, oct_ds = study
    report = dataclasses.replace(
        _report(Eye.RIGHT, Label.GLAUCOMA, [_source(cfp), _source(oct_ds, frame=4)]), numbers_rewritten=2
    )
    path = _save(build_sr(report, [cfp, oct_ds], SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)), tmp_path)
    assert_valid_sr(path, "2 value(s) cited in the findings were written as the measurements of this report")


def test_every_biomarker_is_a_numeric_measurement_with_ucum_unit(study, tmp_path):
    patient, cfp, oct_ds = study
    report = _report(Eye.RIGHT, Label.AMD, [_source(cfp), _source(oct_ds, 4)])
    ds = pydicom.dcmread(
        _save(build_sr(report, [cfp, oct_ds], SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)), tmp_path)
    )
    nums = {}

    def walk(items):
        for item in items:
            if item.ValueType == "NUM":
                measured = item.MeasuredValueSequence[0]
                unit = measured.MeasurementUnitsCodeSequence[0]
                nums[item.ConceptNameCodeSequence[0].CodeMeaning] = (
                    float(measured.NumericValue),
                    unit.CodeValue,
                    unit.CodingSchemeDesignator,
                )
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    assert len(nums) == 37
    for est in report.biomarkers:
        value, unit, scheme = nums[BY_KEY[est.key].name]
        assert (unit, scheme) == (est.unit, "UCUM")
        assert math.isclose(value, est.value, rel_tol=1e-3)


@pytest.mark.parametrize("label", list(Label))
def test_each_label_including_indeterminate_is_coded(label, tmp_path):
    patient = Patient()
    cfp = make_cfp(patient, "L", use_image_laterality=False)  # laterality from Laterality (0020,0060)
    report = _report(Eye.LEFT, label, [_source(cfp)], markers=CFP_BIOMARKERS, missing=("OCT",))
    path = _save(build_sr(report, [cfp], SRKey(patient.study_uid, 2, "0.1.0", Eye.LEFT)), tmp_path)
    code = codes.LABEL_CODES[label]
    assert_valid_sr(path, code.meaning, "Not available for this eye: OCT")
    ds = pydicom.dcmread(path)
    assert code.value in str(ds.ContentSequence)


def test_oct_only_report_with_empty_narrative_is_valid(tmp_path):
    patient = Patient()
    oct_ds = make_oct(patient, "L")
    report = _report(
        Eye.LEFT,
        Label.INDETERMINATE,
        [_source(oct_ds, 4)],
        markers=tuple(b for b in BIOMARKERS if b.unit == "um"),
        missing=("CFP",),
        narrative="",
    )
    path = _save(build_sr(report, [oct_ds], SRKey(patient.study_uid, 1, "0.1.0", Eye.LEFT)), tmp_path)
    assert_valid_sr(path, "The model produced no findings text.", "Indeterminate")


def test_source_without_type2_patient_attributes_still_valid(tmp_path):
    patient = Patient()
    cfp = make_cfp(patient, "R")
    for name in ("AccessionNumber", "PatientBirthDate", "ReferringPhysicianName", "StudyID"):
        delattr(cfp, name)
    report = _report(Eye.RIGHT, Label.NORMAL, [_source(cfp)], markers=CFP_BIOMARKERS, missing=("OCT",))
    path = _save(build_sr(report, [cfp], SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)), tmp_path)
    assert_valid_sr(path, "Normal")


def test_sop_instance_uid_is_derived_from_the_idempotency_key(study):
    patient, cfp, oct_ds = study
    report = _report(Eye.RIGHT, Label.NORMAL, [_source(cfp), _source(oct_ds, 4)])
    key = SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)
    first, second = build_sr(report, [cfp, oct_ds], key), build_sr(report, [cfp, oct_ds], key)
    assert first.SOPInstanceUID == second.SOPInstanceUID == key.sop_instance_uid
    others = {
        SRKey(patient.study_uid, 2, "0.1.0", Eye.RIGHT).sop_instance_uid,
        SRKey(patient.study_uid, 1, "0.2.0", Eye.RIGHT).sop_instance_uid,
        SRKey(patient.study_uid, 1, "0.1.0", Eye.LEFT).sop_instance_uid,
        SRKey("1.2.3", 1, "0.1.0", Eye.RIGHT).sop_instance_uid,
    }
    assert key.sop_instance_uid not in others and len(others) == 4
    assert len(key.sop_instance_uid) <= 64


def _bad_inputs(patient, cfp, oct_ds):
    good = _report(Eye.RIGHT, Label.NORMAL, [_source(cfp), _source(oct_ds, 4)])
    key = SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)
    left_cfp = make_cfp(patient, "L")
    foreign = make_cfp(Patient(), "R")
    nan = dataclasses.replace(good, biomarkers=(BiomarkerEstimate("avr", float("nan"), "1"),))
    return {
        "eye mismatch": (good, [cfp, oct_ds], SRKey(patient.study_uid, 1, "0.1.0", Eye.LEFT), "eye"),
        "bundle mismatch": (good, [cfp, oct_ds], SRKey(patient.study_uid, 1, "9.9", Eye.RIGHT), "bundle"),
        "missing source": (good, [cfp], key, "differ"),
        "no sources": (dataclasses.replace(good, sources=()), [], key, "no source"),
        "wrong laterality": (dataclasses.replace(good, sources=(_source(left_cfp),)), [left_cfp], key, "laterality"),
        "foreign study": (dataclasses.replace(good, sources=(_source(foreign),)), [foreign], key, "belongs to study"),
        "unknown biomarker": (
            dataclasses.replace(good, biomarkers=(BiomarkerEstimate("iop", 15.0, "mm[Hg]"),)),
            [cfp, oct_ds],
            key,
            "unknown biomarker",
        ),
        "wrong unit": (
            dataclasses.replace(good, biomarkers=(BiomarkerEstimate("mt_central", 250.0, "mm"),)),
            [cfp, oct_ds],
            key,
            "expected 'um'",
        ),
        "nan": (nan, [cfp, oct_ds], key, "not finite"),
        "not a label": (dataclasses.replace(good, label="Glaucoma?"), [cfp, oct_ds], key, "not a grok_pacs"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "eye mismatch",
        "bundle mismatch",
        "missing source",
        "no sources",
        "wrong laterality",
        "foreign study",
        "unknown biomarker",
        "wrong unit",
        "nan",
        "not a label",
    ],
)
def test_invalid_inputs_fail_loudly(study, case):
    report, sources, key, message = _bad_inputs(*study)[case]
    with pytest.raises(SRBuildError, match=message):
        build_sr(report, sources, key)


def test_report_command_prints_diagnosis_measurements_and_narrative(study, tmp_path):
    patient, cfp, oct_ds = study
    report = _report(Eye.RIGHT, Label.DIABETIC_RETINOPATHY, [_source(cfp), _source(oct_ds, 4)])
    path = _save(build_sr(report, [cfp, oct_ds], SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)), tmp_path)
    text = render(path)
    assert "Diagnosis: Diabetic retinopathy (4855003, SCT)" in text
    assert "Macular thickness at the central subfield: 255.0 um" in text
    assert report.narrative in text and "UNVERIFIED / PRELIMINARY" in text
    proc = subprocess.run(
        [sys.executable, "-m", "grok_pacs.cli", "report", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Diabetic retinopathy" in proc.stdout
    bad = tmp_path / "not-dicom.dcm"
    bad.write_text("hello")
    proc = subprocess.run(
        [sys.executable, "-m", "grok_pacs.cli", "report", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "not a readable DICOM file" in proc.stderr


def _groups(ds) -> list:
    (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [g for g in measurements.ContentSequence if g.ConceptNameCodeSequence[0].CodeValue == "125007"]


def test_sr_is_displayable_in_ohif_each_eye_in_its_own_dated_series(tmp_path):
    """What OHIF's SR viewport needs (docs/domain.md, Display): every measurement group has a SCOORD POINT SELECTED FROM
    the image it was read from (the OCT B-scan with its frame), one SR per series, SeriesDate set;
    containers SEPARATE so text viewers print "name: value"."""
    patient = Patient()
    right = [make_cfp(patient, "R"), make_oct(patient, "R")]
    left = [make_cfp(patient, "L"), make_oct(patient, "L")]
    paths = {}
    for eye, (cfp, oct_ds) in ((Eye.RIGHT, right), (Eye.LEFT, left)):
        report = _report(eye, Label.AMD, [_source(cfp), _source(oct_ds, frame=4)])
        key = SRKey(patient.study_uid, 1, "0.1.0", eye)
        paths[eye] = _save(build_sr(report, [cfp, oct_ds], key), tmp_path, f"{eye.value}.dcm")
        assert_valid_sr(paths[eye], "Age-related macular degeneration")
    ds = {eye: pydicom.dcmread(path) for eye, path in paths.items()}  # read back from the files
    assert ds[Eye.RIGHT].SeriesInstanceUID != ds[Eye.LEFT].SeriesInstanceUID
    assert ds[Eye.RIGHT].SeriesNumber != ds[Eye.LEFT].SeriesNumber
    for eye, sr in ds.items():
        assert sr.SeriesDate == sr.ContentDate and sr.SeriesTime
        assert ("right" if eye is Eye.RIGHT else "left") in sr.SeriesDescription
        groups = _groups(sr)
        assert len(groups) == 2  # OCT first, then the fundus photograph
        cfp, oct_ds = right if eye is Eye.RIGHT else left
        referenced = []
        for group in groups:
            (scoord,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
            assert scoord.GraphicType == "POINT" and len(scoord.GraphicData) == 2
            (image,) = scoord.ContentSequence
            assert image.RelationshipType == "SELECTED FROM"
            ref = image.ReferencedSOPSequence[0]
            referenced.append((ref.ReferencedSOPInstanceUID, ref.get("ReferencedFrameNumber")))
            assert any(i.ValueType == "NUM" for i in group.ContentSequence)
        assert referenced == [(oct_ds.SOPInstanceUID, 4), (cfp.SOPInstanceUID, None)]
        title = next(i.TextValue for i in groups[0].ContentSequence if i.ValueType == "TEXT")
        assert "retina" in title and "Age-related macular degeneration" in title

        def containers(items):
            for item in items:
                if item.ValueType == "CONTAINER":
                    yield item
                yield from containers(item.get("ContentSequence", []))

        assert sr.ContinuityOfContent == "SEPARATE"
        assert {c.ContinuityOfContent for c in containers(sr.ContentSequence)} == {"SEPARATE"}
    text = render(paths[Eye.RIGHT])
    assert "Image Region: POINT" in text and f"{right[1].SOPInstanceUID} frame 4" in text


def test_oct_point_is_on_the_foveal_pit_when_one_was_found(tmp_path):
    patient = Patient()
    cfp, oct_ds = make_cfp(patient, "R"), make_oct(patient, "R")
    report = _report(Eye.RIGHT, Label.NORMAL, [_source(cfp), _source(oct_ds, frame=4)])
    key = SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT)
    pit = (float(oct_ds.Columns) * 0.6, float(oct_ds.Rows) * 0.3)
    for given, point, statement in (
        (pit, pit, "marks the foveal pit found in it"),
        (None, (oct_ds.Columns / 2, oct_ds.Rows / 2), "no foveal pit was found"),
    ):
        path = _save(build_sr(report, [cfp, oct_ds], key, oct_pit=given), tmp_path, f"{given is None}.dcm")
        assert_valid_sr(path, statement)
        (scoord,) = [i for i in _groups(pydicom.dcmread(path))[0].ContentSequence if i.ValueType == "SCOORD"]
        assert [float(v) for v in scoord.GraphicData] == pytest.approx(list(point))
    with pytest.raises(SRBuildError, match="outside"):
        build_sr(report, [cfp, oct_ds], key, oct_pit=(float(oct_ds.Columns) + 5, 1.0))
