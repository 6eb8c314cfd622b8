"""End to end on CPU: DICOM files (JPEG-baseline OP, multi-frame OPT) -> tiny bundle -> typed Reports."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from devtools.tiny_bundle import TINY_NARRATIVE, build_tiny_bundle, copy_bundle, tiny_decision
from grok_pacs.analysis.bundle import BundleError
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.grounding import ground_cited_numbers
from grok_pacs.analysis.label_calibration import Calibration
from grok_pacs.analysis.result import DECIDER_CLASSIFIER, Eye
from grok_pacs.domain.biomarkers import BY_KEY, CFP_KEYS, OCT_KEYS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.report.pdf import decider_text
from grok_pacs.report.sr import SRKey, build_sr
from tests.helpers.eye_dicom import two_eye_study
from tests.helpers.srcheck import assert_valid_sr

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.from_bundle(tiny_bundle)  # device "auto": CPU here


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Both eyes of one patient; the OCT pits sit at known, non-central frames."""
    return two_eye_study(tmp_path_factory.mktemp("study"))


def test_engine_runs_encoders_on_cpu_without_cuda(engine):
    assert engine.device == "cpu"
    assert engine.cfp_session.get_providers() == ["CPUExecutionProvider"]


def test_study_with_both_eyes_gives_one_grounded_report_per_eye(engine, study):
    reports = engine.analyze_eyes([study[Eye.RIGHT].item, study[Eye.LEFT].item])
    assert [r.eye for r in reports] == [Eye.RIGHT, Eye.LEFT]
    for report in reports:
        pit = study[report.eye].pit
        assert report.label == Label.GLAUCOMA
        assert "Diagnosis: Glaucoma" in report.raw_text
        assert TINY_NARRATIVE in report.raw_text  # the model's own words, kept for audit
        estimates = {b.key: b.value for b in report.biomarkers}
        grounded, rewritten = ground_cited_numbers(TINY_NARRATIVE, estimates)
        assert report.narrative == grounded and "Diagnosis" not in report.narrative
        assert report.numbers_rewritten == rewritten == 2  # the tiny model quotes fixed numbers
        assert report.impression == "These findings indicate glaucoma."
        cited = {c.biomarker_key: c.value for c in report.cited_numbers}
        assert set(cited) == {"cup_to_disc", "rnfl_average"}
        assert cited["cup_to_disc"] == round(estimates["cup_to_disc"], 3)  # the SR's measurement, as written
        assert cited["rnfl_average"] == round(estimates["rnfl_average"], 1)
        assert [b.key for b in report.biomarkers] == list(OCT_KEYS + CFP_KEYS)
        assert all(
            b.unit == BY_KEY[b.key].unit and BY_KEY[b.key].plausible[0] <= b.value <= BY_KEY[b.key].plausible[1]
            for b in report.biomarkers
        )
        assert set(report.label_scores) == {label.value for label in DIAGNOSTIC_LABELS}
        assert sum(report.label_scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert max(report.label_scores, key=report.label_scores.get) == "Glaucoma"
        assert report.missing_modalities == ()
        assert (report.oct_frame_index, report.oct_frame_method) == (pit, "fovea")
        frames = {s.sop_class_uid: s.frame for s in report.sources}
        assert frames == {"1.2.840.10008.5.1.4.1.1.77.1.5.1": None, "1.2.840.10008.5.1.4.1.1.77.1.5.4": pit + 1}
        assert (report.bundle_name, report.bundle_version) == ("grok-tiny", "0.0.1-test")
        assert {"read", "cfp_encoder", "oct_encoder", "generate", "label_scores", "total"} <= set(report.timings_s)
        assert report.to_dict()["label"] == "Glaucoma"


def test_grounding_can_be_turned_off_and_then_the_narrative_is_the_models(engine, study):
    item = study[Eye.RIGHT].item
    original = engine.config
    try:
        engine.config = dataclasses.replace(
            original, generation=dataclasses.replace(original.generation, ground_numbers=False)
        )
        report = engine.analyze_eye(item.eye, item.cfp, item.oct)
    finally:
        engine.config = original
    assert report.narrative == TINY_NARRATIVE and report.numbers_rewritten == 0
    assert {(c.value, c.biomarker_key) for c in report.cited_numbers} == {(0.72, "cup_to_disc"), (24.1, "rnfl_average")}


def test_generation_is_deterministic(engine, study):
    item = study[Eye.RIGHT].item
    first = engine.analyze_eye(item.eye, item.cfp, item.oct)
    second = engine.analyze_eye(item.eye, item.cfp, item.oct)
    assert first.raw_text == second.raw_text and first.biomarkers == second.biomarkers


def test_eye_with_one_modality_says_which_is_missing(engine, study):
    item = study[Eye.LEFT].item
    cfp_only = engine.analyze_eye(Eye.LEFT, cfp=item.cfp)
    assert cfp_only.missing_modalities == ("OCT",)
    assert [b.key for b in cfp_only.biomarkers] == list(CFP_KEYS)
    assert cfp_only.oct_frame_index is None and cfp_only.label in Label
    oct_only = engine.analyze_eye("L", oct=item.oct)
    assert oct_only.missing_modalities == ("CFP",)
    assert [b.key for b in oct_only.biomarkers] == list(OCT_KEYS)
    assert oct_only.oct_frame_index == study[Eye.LEFT].pit
    with pytest.raises(ValueError, match="both are missing"):
        engine.analyze_eye(Eye.LEFT)


def test_truncated_generation_falls_back_to_calibrated_scored_label_or_indeterminate(engine, study):
    item = study[Eye.RIGHT].item
    original, original_calibration, original_decision = engine.config, engine.calibration, engine.decision
    try:
        engine.decision = None  # the language model decides (the paper's configuration)
        short = dataclasses.replace(original.generation, max_new_tokens=8)
        engine.config = dataclasses.replace(original, generation=short)
        assert engine.calibration is None  # the tiny test bundle carries no calibration
        report = engine.analyze_eye(item.eye, item.cfp, item.oct)
        assert "Diagnosis" not in report.raw_text
        assert report.label == Label.INDETERMINATE  # uncalibrated scores never decide a label
        engine.calibration = Calibration(temperature=1.0, fitted_on="test")
        assert engine.analyze_eye(item.eye, item.cfp, item.oct).label == Label.GLAUCOMA  # chosen by the scores
        engine.config = dataclasses.replace(original, generation=dataclasses.replace(short, min_label_probability=1.01))
        assert engine.analyze_eye(item.eye, item.cfp, item.oct).label == Label.INDETERMINATE
    finally:
        engine.config, engine.calibration, engine.decision = original, original_calibration, original_decision


def test_a_validated_narrative_below_the_operating_point_states_no_diagnosis(engine, study):
    """Calibrated bundle: the findings are shipped, but their label only when its probability reaches the
    operating point; below it the eye is Indeterminate and the impression says what the findings concluded."""
    item = study[Eye.RIGHT].item
    original, original_calibration, original_decision = engine.config, engine.calibration, engine.decision
    try:
        engine.decision = None  # the language model decides (the paper's configuration)
        engine.calibration = Calibration(temperature=1.0, fitted_on="test")
        engine.config = dataclasses.replace(
            original, generation=dataclasses.replace(original.generation, min_label_probability=0.0)
        )
        stated = engine.analyze_eye(item.eye, item.cfp, item.oct)
        assert stated.narrative_check.passed and stated.label in DIAGNOSTIC_LABELS
        assert stated.unsupported_label is None
        engine.config = dataclasses.replace(
            original, generation=dataclasses.replace(original.generation, min_label_probability=1.01)
        )
        withheld = engine.analyze_eye(item.eye, item.cfp, item.oct)
        assert withheld.narrative == stated.narrative  # the findings are still shipped
        assert withheld.label == Label.INDETERMINATE and withheld.unsupported_label == stated.label
        assert f"conclude {stated.label.value}" in withheld.impression and "operating point 1.01" in withheld.impression
    finally:
        engine.config, engine.calibration, engine.decision = original, original_calibration, original_decision


def test_engine_refuses_a_tampered_bundle(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    with (bundle / "projectors.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="projectors.safetensors has been modified"):
        Engine.from_bundle(bundle, device="cpu")


def test_base_plus_adapter_bundle_is_merged_at_load(tmp_path, study):
    path = build_tiny_bundle(tmp_path / "adapter-bundle", layout="adapter", train_steps=0)
    engine = Engine.from_bundle(path, device="cpu")
    assert engine.bundle.layout == "adapter"
    assert not any("lora" in name for name, _ in engine.model.llm.named_parameters())
    item = study[Eye.RIGHT].item
    report = engine.analyze_eye(item.eye, item.cfp, item.oct)
    assert report.label in Label and report.raw_text == engine.analyze_eye(item.eye, item.cfp, item.oct).raw_text


def test_the_llm_runs_in_the_precision_asked_for_with_the_same_report(tiny_bundle, study):
    """bf16 where the hardware multiplies it natively (GROK_PACS_LLM_PRECISION=auto); fp32 when a site forces it."""
    item = study[Eye.RIGHT].item
    reports = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        engine = Engine.from_bundle(tiny_bundle, device="cpu", llm_precision=precision)
        assert engine.llm_precision == precision
        assert {p.dtype for p in engine.model.llm.parameters()} == {dtype}
        reports[precision] = engine.analyze_eye(item.eye, item.cfp, item.oct)
    for report in reports.values():
        assert report.label == Label.GLAUCOMA and TINY_NARRATIVE in report.raw_text
    assert reports["bf16"].narrative == reports["fp32"].narrative


# --- the decision classifier decides (issue 32) -----------------------------------------------------------
def test_the_decision_classifier_states_its_label_and_the_sr_says_who_decided(engine, study, tmp_path):
    """The tiny bundle's classifier (devtools.tiny_bundle.tiny_decision) decides Glaucoma at 0.8, above its
    operating point; the findings conclude the same label, so it is stated, and the SR and PDF say that a
    classifier decided the label and the language model wrote the findings."""
    item, datasets, patient, _ = study[Eye.RIGHT]
    report = engine.analyze_eye(item.eye, item.cfp, item.oct, sources=item.sources)
    assert engine.decider == DECIDER_CLASSIFIER and report.decided_by == DECIDER_CLASSIFIER
    assert report.label == Label.GLAUCOMA and report.lm_label == Label.GLAUCOMA and report.unsupported_label is None
    assert report.label_scores["Glaucoma"] == pytest.approx(0.8) and report.probabilities_calibrated
    assert report.operating_point == engine.decision.operating_point == 0.5
    assert set(report.lm_scores) == {label.value for label in DIAGNOSTIC_LABELS}  # the LM's, kept for audit
    path = tmp_path / "decided.dcm"
    build_sr(report, datasets, SRKey(patient.study_uid, 1, report.bundle_version, Eye.RIGHT)).save_as(
        path, enforce_file_format=True
    )
    assert_valid_sr(path, "Label decided by a classifier on the biomarker estimates; findings written by the language")
    assert decider_text(report) == "Label decided by the decision classifier; findings written by the language model."


def test_below_the_classifier_operating_point_the_eye_is_indeterminate(engine, study):
    item = study[Eye.RIGHT].item
    original = engine.decision
    try:
        engine.decision = dataclasses.replace(original, operating_point=0.85)  # chosen on validation, say
        report = engine.analyze_eye(item.eye, item.cfp, item.oct)
    finally:
        engine.decision = original
    assert report.label == Label.INDETERMINATE and report.unsupported_label == Label.GLAUCOMA
    assert "probability for Glaucoma, 0.80, is below the operating point 0.85" in report.impression
    assert report.narrative  # the findings are still shipped for review
    assert engine.analyze_eye(item.eye, item.cfp, item.oct).label == Label.GLAUCOMA  # 0.8 >= 0.5 again


def test_findings_that_conclude_another_label_leave_the_eye_indeterminate(engine, study):
    item = study[Eye.RIGHT].item
    original = engine.decision
    try:
        engine.decision = tiny_decision("AMD", 0.9)  # the tiny LLM's findings conclude Glaucoma whatever it reads
        report = engine.analyze_eye(item.eye, item.cfp, item.oct)
    finally:
        engine.decision = original
    assert report.label == Label.INDETERMINATE and report.unsupported_label == Label.AMD
    assert report.lm_label == Label.GLAUCOMA and report.label_scores["AMD"] == pytest.approx(0.9)
    assert "the classifier decided AMD (0.90) but the findings conclude Glaucoma" in report.impression
