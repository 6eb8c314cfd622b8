"""Dispositions (grok_pacs.report.dispositions): the table's rows per eye, the patient roll-up over both
eyes (worse eye decides, systemic labels once), a site's own table, and both in a valid SR."""

from __future__ import annotations

import dataclasses

import pytest

from grok_pacs.analysis.quality import QualityThresholds, judge, ungradable_report
from grok_pacs.analysis.result import Action, Eye, Gradability, SourceImage
from grok_pacs.report import dispositions
from grok_pacs.report.dispositions import DEFAULT_TABLE, DispositionTableError, for_eye, load_table, roll_up
from grok_pacs.report.sr import SRKey, build_sr
from tests.helpers.ophthalmic_dicom import Patient, hand_built_report, make_cfp, make_oct
from tests.helpers.srcheck import assert_valid_sr


def eye_report(eye: str, label: str, datasets, **biomarkers: float):
    report = hand_built_report(eye, datasets, label=label)
    values = tuple(dataclasses.replace(b, value=biomarkers.get(b.key, b.value)) for b in report.biomarkers)
    return dataclasses.replace(report, biomarkers=values)


@pytest.fixture
def study():
    patient = Patient()
    return patient, {eye: [make_cfp(patient, eye), make_oct(patient, eye)] for eye in "RL"}


def ungradable(eye: str, datasets):
    ds = datasets[0]
    verdict = judge("CFP", ds, None, "JPEG frame 1 is corrupt", ds.SOPInstanceUID, QualityThresholds())
    return ungradable_report(
        Eye(eye), (verdict,), (SourceImage(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID),), "tiny", "0.1.0"
    )


@pytest.mark.parametrize(
    "label, markers, action, rule",
    [
        ("DiabeticRetinopathy", {"mt_central": 340.0}, Action.URGENT_REFERRAL, "dr-oedema"),
        ("DiabeticRetinopathy", {"mt_central": 250.0}, Action.REFERRAL, "dr"),
        ("AMD", {"mt_central": 330.0}, Action.URGENT_REFERRAL, "amd-wet"),
        ("AMD", {"isos_rpe_central": 110.0}, Action.URGENT_REFERRAL, "amd-wet-fluid"),
        ("AMD", {"mt_central": 250.0}, Action.REFERRAL, "amd"),
        ("Normal", {"cup_to_disc": 0.75}, Action.REFERRAL, "glaucoma-cdr"),
        ("Glaucoma", {"cup_to_disc": 0.5}, Action.REFERRAL, "glaucoma"),
        ("Hypertension", {}, Action.REFERRAL, "hypertension"),
        ("Diabetes", {}, Action.RESCREEN, "diabetes"),
        ("Normal", {}, Action.RESCREEN, "normal"),
        ("Indeterminate", {}, Action.REFERRAL, "indeterminate"),
        # no diagnosis, but subretinal fluid or central thickening: urgent whatever the cause (wet AMD, DME)
        ("Indeterminate", {"isos_rpe_central": 110.0}, Action.URGENT_REFERRAL, "indeterminate-fluid"),
        ("Indeterminate", {"mt_central": 330.0}, Action.URGENT_REFERRAL, "indeterminate-thickening"),
    ],
)
def test_table_rows(study, label, markers, action, rule):
    _, eyes = study
    disposition = for_eye(eye_report("R", label, eyes["R"], **markers))
    assert (disposition.action, disposition.rule) == (action, rule) and disposition.source
    if action is Action.RESCREEN:
        assert disposition.rescreen_months in (12, 24)


def _with_errors(report, **errors: float):
    return dataclasses.replace(
        report, biomarkers=tuple(dataclasses.replace(b, error=errors.get(b.key)) for b in report.biomarkers)
    )


@pytest.mark.parametrize(
    "label, value, error, action, rule",
    [
        # 292 um with a typical error of 10: the eye may be at 300, so the oedema row cannot be ruled out
        ("DiabeticRetinopathy", 292.0, 10.0, Action.URGENT_REFERRAL, "dr-oedema"),
        ("DiabeticRetinopathy", 292.0, 5.0, Action.REFERRAL, "dr"),  # 297 at most: below the threshold
        ("DiabeticRetinopathy", 292.0, None, Action.REFERRAL, "dr"),  # a bundle that states no error
        ("AMD", 292.0, 10.0, Action.URGENT_REFERRAL, "amd-wet"),
        ("Indeterminate", 292.0, 10.0, Action.URGENT_REFERRAL, "indeterminate-thickening"),
        # only urgent rows are cautious; a non-urgent label keeps its row
        ("Normal", 292.0, 10.0, Action.RESCREEN, "normal"),
    ],
)
def test_an_urgent_sign_within_the_estimate_error_is_referred_urgently(study, label, value, error, action, rule):
    """Central subfield thickness estimated below the 300 um of the urgent rows, by less than its typical error
    (the bundle's, grok_pacs.analysis.estimate_error): urgent, and the disposition says why."""
    _, eyes = study
    report = _with_errors(eye_report("R", label, eyes["R"], mt_central=value, isos_rpe_central=40.0), mt_central=error)
    disposition = for_eye(report)
    assert (disposition.action, disposition.rule) == (action, rule)
    matched, how = dispositions.first_match(report)
    assert matched.rule == rule and (how == dispositions.WITHIN_ERROR) == (action is Action.URGENT_REFERRAL)
    within = "within its typical error of 10.0 um of the >= 300 threshold: the sign cannot be ruled out"
    assert (within in disposition.text) == (action is Action.URGENT_REFERRAL)
    if action is Action.URGENT_REFERRAL:
        met = for_eye(_with_errors(eye_report("R", label, eyes["R"], mt_central=310.0), mt_central=error))
        assert met.rule == rule and "cannot be ruled out" not in met.text  # met outright: no note


def test_a_cautious_row_needs_a_biomarker_condition():
    with pytest.raises(DispositionTableError, match="cautious needs a biomarker condition"):
        dispositions.Rule("x", Action.URGENT_REFERRAL, "text", "source", cautious=True)


def test_every_default_row_names_its_guideline_source():
    assert all(rule.source.strip() for rule in DEFAULT_TABLE)
    # The clinician reads the source in the SR and PDF: it names a public guideline, never an internal document.
    assert not [rule.rule for rule in DEFAULT_TABLE if "SPEC" in rule.source or "docs/" in rule.source]


def test_ungradable_eye_is_retake_and_roll_up_takes_the_worse_eye(study):
    _, eyes = study
    normal = eye_report("R", "Normal", eyes["R"])
    bad = ungradable("L", eyes["L"])
    assert for_eye(bad).action is Action.RETAKE and for_eye(bad).text == "Image quality insufficient: retake, or refer"
    right, left = dispositions.apply([normal, bad])
    assert right.patient_disposition == left.patient_disposition
    assert right.patient_disposition.action is Action.RETAKE and right.patient_disposition.eyes == ("L",)
    urgent = eye_report("R", "DiabeticRetinopathy", eyes["R"], mt_central=340.0)
    right, left = dispositions.apply([urgent, bad])
    assert right.patient_disposition.action is Action.URGENT_REFERRAL and right.patient_disposition.eyes == ("R",)


def test_systemic_labels_once_per_patient_and_cdr_asymmetry(study):
    _, eyes = study
    both = dispositions.apply([eye_report("R", "Hypertension", eyes["R"]), eye_report("L", "Hypertension", eyes["L"])])
    assert both[0].patient_disposition.systemic == ("Hypertension",)
    assert both[0].patient_disposition.eyes == ("R", "L")
    asym = dispositions.apply(
        [eye_report("R", "Normal", eyes["R"], cup_to_disc=0.3), eye_report("L", "Normal", eyes["L"], cup_to_disc=0.55)]
    )
    assert asym[0].patient_disposition.rule == "glaucoma-asymmetry"
    assert asym[0].patient_disposition.action is Action.REFERRAL
    diabetes = dispositions.apply([eye_report("R", "Diabetes", eyes["R"]), eye_report("L", "Normal", eyes["L"])])
    assert diabetes[0].patient_disposition.rescreen_months == 12  # the shorter interval decides
    with pytest.raises(ValueError):
        roll_up([eye_report("R", "Normal", eyes["R"])])  # no eye disposition yet


def test_a_site_table_replaces_the_default(tmp_path, study):
    _, eyes = study
    path = tmp_path / "table.toml"
    path.write_text("""
[[rule]]
rule = "site-ungradable"
gradability = "not-gradable"
action = "referral"
text = "Refer: no result"
source = "Site policy 2026-01"

[[rule]]
rule = "site-any"
action = "rescreen"
rescreen_months = 6
text = "Rescreen"
source = "Site policy 2026-01"
""")
    table = load_table(path)
    assert for_eye(eye_report("R", "AMD", eyes["R"]), table).rule == "site-any"
    assert for_eye(ungradable("L", eyes["L"]), table).action is Action.REFERRAL
    path.write_text('[[rule]]\nrule = "x"\naction = "maybe"\ntext = "t"\nsource = "s"\n')
    with pytest.raises(DispositionTableError, match="action"):
        load_table(path)
    path.write_text('[[rule]]\nrule = "x"\naction = "rescreen"\ntext = "t"\nsource = "s"\n')
    with pytest.raises(DispositionTableError, match="rescreen interval"):
        load_table(path)


def test_sr_codes_eye_and_patient_dispositions(tmp_path, study):
    patient, eyes = study
    reports = dispositions.apply(
        [eye_report("R", "DiabeticRetinopathy", eyes["R"], mt_central=340.0), eye_report("L", "Diabetes", eyes["L"])]
    )
    for report in reports:
        key = SRKey(patient.study_uid, 1, "0.1.0", report.eye)
        path = tmp_path / f"{report.eye.value}.dcm"
        build_sr(report, eyes[report.eye.value], key).save_as(path)
        text = assert_valid_sr(
            path,
            "Urgent referral to ophthalmology",
            "Patient-level recommendation",
            "Gradable",
            "Systemic findings (once per patient): Diabetes",
        )
        assert "NHS Diabetic Eye Screening Programme" in text
    assert reports[0].gradability is Gradability.GRADABLE


def test_a_broken_site_table_stops_the_worker_at_start(tmp_path):
    from grok_pacs.config import SettingsError, load_settings
    from grok_pacs.jobs.worker import WorkerContext

    path = tmp_path / "table.toml"
    path.write_text('[[rule]]\nrule = "x"\naction = "referral"\ntext = "t"\nsource = "s"\nlabel = "Flu"\n')
    with pytest.raises(SettingsError, match="disposition_table: .*label 'Flu'"):
        WorkerContext(load_settings(data_dir=tmp_path / "data", disposition_table=path))
