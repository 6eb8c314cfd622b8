"""The ML team's retraining, end to end, typed as they would type it (issue 33): a messy PACS export ->
`python -m training.cohort from-dicom` -> `python -m training.pipeline --manifest` -> `python -m training.compare`
against the demo's bundle.

The export is tests.helpers.messy_export's (every planted problem once, a third of the measurements missing,
two eyes without any). The pipeline trains the small configuration with the tiny from-scratch LLM (`--llm tiny`:
the smallest that still trains every stage and packs a verified, calibrated bundle). The serving bundle is the
demo's: tests/training/test_demo.py, earlier in the same run (file order), leaves it in `.cache/pipeline/`, and
the demo's own command line gives its path at once (run alone, this test builds it the way `make demo` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grok_pacs.domain.biomarkers import BIOMARKERS
from tests.helpers.messy_export import from_dicom_argv
from training.manifest import load_manifest
from training.stage1.run import record_id

ROOT = Path(__file__).resolve().parents[2]
DEMO_CACHE = ROOT / ".cache" / "pipeline"  # tests/training/test_demo.py's and `make demo`'s
CANDIDATE_VERSION = "0.2.0-retrained"
SALT = "retrain-end-to-end-test-salt"  # fixed: the same pseudonyms, so the same split, in every run
# Training in a fixture: about 2.5 min on 2 cores (7 min on a loaded machine) against the 600 s default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _run(*argv: str, timeout: int) -> subprocess.CompletedProcess:
    """`python -m ...` from the checkout, as a user runs it, on every core (as test_demo.py: nothing runs beside
    it; the suite's one-thread setting is for tests that share the cores); a failure shows its last words."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    assert done.returncode == 0, (argv[:2], done.stdout[-3000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    argv, info = from_dicom_argv(tmp_path_factory.mktemp("retrain"), salt_text=SALT)
    done = _run("training.cohort", *argv, timeout=300)
    return {**info, "stdout": done.stdout, "manifest": info["out"] / "manifest.csv"}


@pytest.fixture(scope="module")
def trained(export: dict) -> dict:
    result = export["tmp"] / "pipeline.json"
    argv = ["--manifest", str(export["manifest"]), "--llm", "tiny", "--bundle-version", CANDIDATE_VERSION]
    argv += ["--cache", str(export["tmp"] / "pipeline-cache"), "--json-out", str(result), "--quiet"]
    _run("training.pipeline", *argv, timeout=900)
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = tmp_path_factory.mktemp("demo") / "pipeline.json"
    _run("training.pipeline", "--cache", str(DEMO_CACHE), "--json-out", str(result), "--quiet", timeout=3500)
    return Path(json.loads(result.read_text())["bundle"])


def test_from_dicom_reports_every_planted_problem_on_its_table(export: dict) -> None:
    reasons = {}
    for line in export["stdout"].splitlines():
        for item in export["planted"]:
            if f" {item} " in f" {line} ":
                reasons[item] = line
    assert set(reasons) == set(export["planted"]), sorted(set(export["planted"]) - set(reasons))
    for item, reason in export["planted"].items():
        assert reasons[item].startswith(reason), (item, reason, reasons[item])
    for row, reason in export["expected_rows"].items():  # "labels:row 15" -> "unknown subject  labels  row 15 ..."
        source, what = row.split(":")
        expected = [*reason.split(), source, *what.split()]
        assert any(line.split()[: len(expected)] == expected for line in export["stdout"].splitlines()), row
    report = json.loads((export["out"] / "cohort-report.json").read_text())
    assert {u["item"]: u["reason"] for u in report["unused"] if u["source"] == "export"} == export["planted"]
    assert report["counts"]["eyes"] == 24


def test_every_eye_gets_an_instruction_record_even_without_measurements(export: dict, trained: dict) -> None:
    records = load_manifest(export["manifest"])
    bare = {record_id(r.subject_id, r.eye) for r in records if all(v != v for v in r.biomarkers.values())}
    assert len(bare) == 2  # patients 12 and 13: labels, no measurements row
    written = [json.loads(line) for line in Path(trained["instructions"]).read_text().splitlines()]
    assert {r["id"] for r in written} == {record_id(r.subject_id, r.eye) for r in records}  # none rejected
    for record in written:
        report = record["conversations"][1]["value"]
        if record["id"] in bare:
            assert record["not_measured"] == [b.key for b in BIOMARKERS] and record["biomarkers"]["OCT_Measures"] == {}
            assert report.startswith("The biomarkers were not measured for this eye"), report
        else:
            assert 0 < len(record["not_measured"]) < len(BIOMARKERS) and "not measured" not in report


def test_the_manifest_trains_through_every_stage_with_measurements_missing(export: dict, trained: dict) -> None:
    assert not any(trained["reused"].values()) and Path(trained["bundle"]).is_dir()
    for modality in ("OCT", "CFP"):  # stage 2 scores each head on the eyes that have its biomarker
        scored = json.loads(Path(trained["stage2"][modality]["report"]).read_text())
        counts = [m["n"] for m in scored["encoders"]["aligned"]["per_biomarker"].values()]
        assert 0 < min(counts) < scored["n_test_eyes"], counts
    bundle = json.loads((Path(trained["bundle"]) / "manifest.json").read_text())
    assert bundle["version"] == CANDIDATE_VERSION
    cohort = bundle["provenance"]["cohort"]
    assert cohort["manifest_sha256"] == hashlib.sha256(export["manifest"].read_bytes()).hexdigest()
    assert cohort["eyes"] == 24 and 0.5 < cohort["biomarker_values_present"] < 0.75  # a third missing, 2 eyes bare
    assert bundle["calibration"]  # fitted on the validation eyes


@pytest.mark.timeout(3600)  # run alone (no test_demo.py before it), its fixture trains the demo's bundle
def test_compare_with_the_demo_bundle_prints_a_verdict_on_the_same_eyes(
    export: dict, trained: dict, demo_bundle: Path
) -> None:
    out = export["tmp"] / "comparison"
    candidate = Path(trained["bundle"])
    argv = [str(candidate), str(demo_bundle), "--manifest", str(export["manifest"]), "--out", str(out)]
    # Several eyes a generation (--batch-eyes): the same labels in a fraction of the time on a CPU (the tiny
    # LLM writes to its 512-token bound on every eye); the seconds per eye are then not the runtime's.
    argv += ["--batch-eyes", "8", "--resamples", "300", "--quiet"]
    printed = _run("training.compare", *argv, timeout=900).stdout
    lines = printed.splitlines()
    serving = json.loads((demo_bundle / "manifest.json").read_text())
    assert lines[0] == f"candidate: grok version {CANDIDATE_VERSION} ({candidate})", lines
    assert lines[1] == f"serving:   {serving['name']} version {serving['version']} ({demo_bundle})", lines
    data = json.loads((out / "comparison.json").read_text())
    decision = data["verdict"]["decision"]
    assert f"verdict: {decision}" in lines and decision in ("promote", "keep serving")
    assert (decision == "promote") == all(check["passed"] for check in data["verdict"]["checks"])
    assert f"rule: {data['rule']}" in lines and data["rule"].startswith("promote when the lower bound")
    # Both bundles scored on the same held-out eyes: the manifest's test split, in one order.
    test_eyes = sorted(record_id(r.subject_id, r.eye) for r in load_manifest(export["manifest"]) if r.split == "test")
    assert data["candidate"]["eyes"] == data["serving"]["eyes"] and sorted(data["serving"]["eyes"]) == test_eyes
    assert data["n_eyes"] == len(test_eyes) >= 4  # 15 % of 13 subjects, stratified by label
    for role in ("candidate", "serving"):
        assert sum(map(sum, data[role]["confusion"]["counts"])) == len(test_eyes) and data[role]["seconds_per_eye"] > 0
    # Side by side: every figure with both values and the paired difference, in the JSON and the markdown.
    for metric in ("macro_f1", "accuracy", "ece", "referral_sensitivity", "validator_pass_rate"):
        row = data["figures"][metric]
        assert {"serving", "candidate", "difference"} <= set(row), metric
    macro = data["figures"]["macro_f1"]
    assert f"macro-F1 {macro['candidate']['value']:.4f} vs {macro['serving']['value']:.4f}" in printed
    markdown = (out / "comparison.md").read_text()
    assert "| figure | serving | candidate | difference |" in markdown
    assert f"**Verdict: {decision}.** Rule: {data['rule']}." in markdown
    assert f"vs serving {serving['name']} {serving['version']}" in markdown
