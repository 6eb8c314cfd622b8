"""`python -m training.compare`: a candidate bundle against the serving one on the same held-out eyes.

The paired bootstrap on known per-eye outcomes (a clearly better candidate is promoted, a worse one or one that
fails a safety figure is not; the figures agree with the benchmark's own), and the command on the tiny bundle
compared with a copy of itself under another version: identical figures, zero differences, the rule printed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from devtools.tiny_bundle import copy_bundle
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from training.benchmark.classification import classify
from training.calibration import expected_calibration_error
from training.compare import Outcomes, paired_bootstrap, verdict
from training.compare.__main__ import main

LABELS = [label.value for label in DIAGNOSTIC_LABELS]


def outcomes(truth, predicted, **changes) -> Outcomes:
    """Per-eye outcomes with healthy defaults: confident when right, every narrative valid, grounded, referred
    when the truth calls for it."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    n = len(truth)
    defaults = dict(
        truth=truth,
        predicted=predicted,
        confidence=np.where(truth == predicted, 0.9, 0.5),
        top_correct=truth == predicted,
        refer_predicted=truth != LABELS.index("Normal"),
        refer_truth=truth != LABELS.index("Normal"),
        validated=np.ones(n, bool),
        passed=np.ones(n, bool),
        repeats=np.zeros(n),
        n_cited=np.full(n, 3),
        n_agree=np.full(n, 3),
        bleu4=np.full(n, 0.2),
        rouge_l=np.full(n, 0.4),
        rubric_total=np.full(n, 40.0),
    )
    return Outcomes(**{**defaults, **changes})


def cohort(n: int = 140, seed: int = 0):
    """True labels, and predictions right on 90 % of the eyes."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % len(LABELS)
    good = np.where(rng.random(n) < 0.9, truth, (truth + 1) % len(LABELS))
    return truth, good


def test_identical_bundles_differ_by_nothing_and_are_promoted() -> None:
    truth, good = cohort()
    table = paired_bootstrap(outcomes(truth, good), outcomes(truth, good), resamples=300)
    for metric, row in table.items():
        assert row["serving"] == row["candidate"], metric
        if row["difference"]["value"] is not None:
            assert row["difference"]["value"] == 0.0 and row["difference"]["interval"] == [0.0, 0.0], metric
    assert verdict(table)["promote"]


def test_a_clearly_better_candidate_is_promoted_and_a_worse_one_is_not() -> None:
    truth, good = cohort()
    rng = np.random.default_rng(1)
    poor = np.where(rng.random(len(truth)) < 0.6, truth, (truth + 2) % len(LABELS))  # right on ~60 %
    better = paired_bootstrap(outcomes(truth, poor), outcomes(truth, good), resamples=500, seed=3)
    assert better["macro_f1"]["difference"]["interval"][0] > 0.1, better["macro_f1"]
    assert verdict(better)["promote"]
    worse = paired_bootstrap(outcomes(truth, good), outcomes(truth, poor), resamples=500, seed=3)
    decision = verdict(worse)
    assert not decision["promote"]
    assert [c["figure"] for c in decision["checks"] if not c["passed"]] == ["macro_f1"], decision


def test_a_candidate_worse_on_a_safety_figure_is_not_promoted_however_good_its_labels() -> None:
    truth, good = cohort()
    n = len(truth)
    withheld = np.arange(n) % 4 == 0  # a quarter of its narratives fail the validator
    missed = (np.arange(n) % 3 == 0) & (truth != LABELS.index("Normal"))  # a third of the referrals missed
    serving = outcomes(truth, good)
    for changes, figure in (
        ({"passed": ~withheld}, "validator_pass_rate"),
        ({"refer_predicted": (truth != LABELS.index("Normal")) & ~missed}, "referral_sensitivity"),
        ({"n_agree": np.where(withheld, 1, 3)}, "grounding_agreement"),
    ):
        decision = verdict(paired_bootstrap(serving, outcomes(truth, good, **changes), resamples=300))
        assert not decision["promote"]
        assert [c["figure"] for c in decision["checks"] if not c["passed"]] == [figure], decision


def test_the_bootstrapped_figures_are_the_benchmarks_own() -> None:
    """Point values equal training.benchmark.classification and training.calibration on the same eyes."""
    truth, good = cohort(60, seed=4)
    good[:5] = len(LABELS)  # Indeterminate: no valid label named
    rng = np.random.default_rng(5)
    scores = [dict(zip(LABELS, map(float, p))) for p in rng.dirichlet(np.ones(len(LABELS)) * 0.3, len(truth))]
    top = [max(s, key=s.get) for s in scores]
    mine = outcomes(
        truth,
        good,
        confidence=np.array([s[t] for s, t in zip(scores, top)]),
        top_correct=np.array([t == LABELS[i] for t, i in zip(top, truth)]),
    )
    table = paired_bootstrap(mine, mine, resamples=50)
    from grok_pacs.domain.labels import Label

    predicted = [Label.INDETERMINATE if p == len(LABELS) else DIAGNOSTIC_LABELS[p] for p in good]
    reference = classify([DIAGNOSTIC_LABELS[t] for t in truth], predicted)
    assert table["macro_f1"]["serving"]["value"] == pytest.approx(reference.macro_f1)
    assert table["accuracy"]["serving"]["value"] == pytest.approx(reference.accuracy)
    for scores_of_label in reference.per_label:
        assert table[f"f1_{scores_of_label.label}"]["serving"]["value"] == pytest.approx(scores_of_label.f1)
    ece = expected_calibration_error(scores, [LABELS[t] for t in truth])
    assert table["ece"]["serving"]["value"] == pytest.approx(ece)


def test_bundles_scored_on_different_eyes_are_refused() -> None:
    truth, good = cohort(14)
    with pytest.raises(ValueError, match="same eyes"):
        paired_bootstrap(outcomes(truth, good), outcomes(truth[:7], good[:7]))


# ---- the command, end to end on the tiny bundle ------------------------------------------------------------
@pytest.fixture(scope="module")
def held_out_manifest(tmp_path_factory) -> Path:
    """Three phantom subjects (six eyes), every eye in the test split."""
    from training.manifest import load_manifest, write_manifest
    from training.phantom import generate_cohort

    folder = tmp_path_factory.mktemp("compare-cohort")
    manifest = generate_cohort(folder, 3, seed=5, dicom=False, workers=1, progress=False)
    records = [dataclasses.replace(r, split="test") for r in load_manifest(manifest)]
    return write_manifest(folder / "held-out.csv", records)


def test_the_tiny_bundle_against_itself_is_identical_and_promoted(
    tiny_bundle: Path, held_out_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    candidate = copy_bundle(tiny_bundle, tmp_path / "candidate")
    manifest_file = candidate / "manifest.json"
    bundle_manifest = json.loads(manifest_file.read_text())
    bundle_manifest["version"] = "9.9.9-candidate"
    manifest_file.write_text(json.dumps(bundle_manifest, indent=2))
    serving_version = json.loads((tiny_bundle / "manifest.json").read_text())["version"]

    argv = [str(candidate), str(tiny_bundle), "--manifest", str(held_out_manifest), "--quiet", "--resamples", "200"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "version 9.9.9-candidate" in printed and f"version {serving_version}" in printed, printed
    assert "verdict: promote" in printed and "rule: promote when the lower bound" in printed, printed

    out = tmp_path / "candidate.compare"  # the default: beside the candidate
    data = json.loads((out / "comparison.json").read_text())
    assert data["schema"] == "grok-pacs-compare/1" and data["n_eyes"] == 6 and data["split"] == "test"
    assert data["candidate"]["version"] == "9.9.9-candidate" and data["serving"]["version"] == serving_version
    assert data["verdict"]["decision"] == "promote" and data["rule"].startswith("promote when")
    assert data["candidate"]["summary"] == data["serving"]["summary"]
    assert data["candidate"]["confusion"] == data["serving"]["confusion"]
    assert sum(map(sum, data["candidate"]["confusion"]["counts"])) == 6
    assert data["candidate"]["seconds_per_eye"] > 0 and data["serving"]["seconds_per_eye"] > 0
    assert data["figures"]["macro_f1"]["serving"]["value"] == pytest.approx(data["serving"]["summary"]["macro_f1"])
    for metric in ("macro_f1", "accuracy", "ece", "referral_sensitivity", "validator_pass_rate"):
        row = data["figures"][metric]
        assert row["serving"] == row["candidate"], metric
        assert row["difference"]["value"] == 0.0 and row["difference"]["interval"] == [0.0, 0.0], metric
    markdown = (out / "comparison.md").read_text()
    assert "**Verdict: promote.** Rule: promote when" in markdown and "9.9.9-candidate" in markdown
    linked = re.findall(r"\]\(([^)]+\.md)\)", markdown)  # each bundle's own benchmark report
    assert len(linked) == 2 and all((out / name).is_file() for name in linked), linked


def test_a_manifest_without_the_split_is_a_clear_error(
    tiny_bundle: Path, held_out_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [str(tiny_bundle), str(tiny_bundle), "--manifest", str(held_out_manifest), "--split", "val"]
    assert main(argv) == 2
    assert "no eyes in the 'val' split" in capsys.readouterr().err
