"""Stage-1 output: report validation catches each kind of bad report; JSONL in the paper's format; CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grok_pacs.analysis.grounding import find_citations
from grok_pacs.domain.labels import Label
from training.manifest import load_manifest
from training.phantom import generate_cohort
from training.stage1.run import run_stage1, validate_report
from training.stage1.teachers.guideline import GuidelineTeacher
from training.stage1.teachers.knowledge import HUMAN_TURN, load_knowledge

PAPER_HUMAN_TURN = (
    "<image>\nInterpret the retinal images, identify and analyze the key features and abnormalities, "
    "then write a single-paragraph evidence-based clinical diagnosis report that is supported by the "
    "findings."
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), 7, seed=31, dicom=False, workers=1, progress=False)


@pytest.fixture(scope="module")
def good(manifest: Path):
    record = next(r for r in load_manifest(manifest) if r.label == Label.GLAUCOMA)
    return record, GuidelineTeacher(load_knowledge()).write(record)


def test_validation_reports_each_kind_of_problem(good) -> None:
    record, text = good
    values, label = record.biomarkers, record.label
    assert validate_report(text, label, values) == []
    body, conclusion = text.rsplit(". ", 1)
    first = next(c for c in find_citations(text) if c.biomarker_key)
    wrong = text[: first.start] + f"{first.value * 1.5:.1f}" + text[first.end :]
    cases = {
        "words": text + " " + " ".join(["Further detail."] * 60),
        "line break": text.replace(". ", ".\n\n", 1),
        "does not name Glaucoma": body + ". Overall, the findings are most consistent with hypertension.",
        "also names AMD": body + ". Overall, the findings suggest glaucoma rather than AMD.",
        "reveals": text.replace(". ", ". As the given label says, this is glaucoma. ", 1),
        "whose value is": wrong,
        "tied to no biomarker": text.replace(". ", ". A focal change measures 12.5 um. ", 1),
        "only 0 number(s)": "The optic disc is cupped and the nerve fibre layer thin, unlike AMD, diabetes, "
        "hypertension or Alzheimer's disease. Overall, this is glaucoma.",
        "other label(s)": f"The cup-to-disc ratio is {values['cup_to_disc']:.3f}, the RNFL thickness "
        f"{values['rnfl_average']:.1f} um and the GCIPL thickness {values['gcipl_average']:.1f} um. "
        "Overall, this is glaucoma.",
    }
    for expected, bad in cases.items():
        problems = validate_report(bad, label, values)
        assert any(expected in p for p in problems), (expected, problems)
    assert validate_report("", label, values) == ["empty report"]


class _HalfBadTeacher:
    """A teacher whose reports for right eyes conclude the wrong diagnosis."""

    name = "half-bad"

    def __init__(self) -> None:
        self.inner = GuidelineTeacher(load_knowledge())

    def write(self, record) -> str:
        text = self.inner.write(record)
        if record.eye == "R":
            other = "glaucoma" if record.label != Label.GLAUCOMA else "hypertension"
            text = text.rsplit(". ", 1)[0] + f". Overall, the findings are most consistent with {other}."
        return text


def test_instruction_jsonl_is_the_papers_format_and_rejects_are_listed(manifest: Path, tmp_path: Path) -> None:
    assert HUMAN_TURN == PAPER_HUMAN_TURN
    result = run_stage1(manifest, tmp_path / "s1", _HalfBadTeacher(), progress=False)
    accepted = [json.loads(line) for line in result.instructions.read_text().splitlines()]
    rejected = [json.loads(line) for line in result.rejected.read_text().splitlines()]
    assert len(accepted) == 7 and len(rejected) == 7 and {r["id"][-1] for r in rejected} == {"R"}
    assert all("concluding sentence does not name" in r["reasons"][0] for r in rejected)
    for rec in accepted:
        assert rec["id"] == f"{rec['subject_id']}_{rec['eye']}" and rec["label"] in {label.value for label in Label}
        assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"]
        assert rec["conversations"][0]["value"] == PAPER_HUMAN_TURN
        assert (manifest.parent / rec["image"]).is_file() and rec["image"].endswith("cfp.png")
        assert rec["octs"].endswith(f"oct/{rec['fovea_frame']:03d}.png") and (manifest.parent / rec["octs"]).is_file()
        assert (
            set(rec["biomarkers"]) == {"OCT_Measures", "CFP_Measures"} and len(rec["biomarkers"]["OCT_Measures"]) == 31
        )
    summary = json.loads((tmp_path / "s1" / "stage1.json").read_text())
    assert summary["accepted"] == 7 and summary["rejected"] == 7 and sum(summary["accepted_by_label"].values()) == 7


def test_cli_writes_instructions_with_progress(manifest: Path, tmp_path: Path) -> None:
    help_run = subprocess.run(
        [sys.executable, "-m", "training.stage1", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_run.returncode == 0 and "--teacher" in help_run.stdout and "rejected" in help_run.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.stage1",
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "cli"),
            "--splits",
            "train",
            "--limit",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "eye" in run.stderr  # the tqdm progress bar
    lines = (tmp_path / "cli" / "instructions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["split"] == "train" for line in lines)


@pytest.mark.parametrize("measured", [0, 1, 2])
def test_an_eye_with_few_or_no_measurements_gets_a_record_saying_what_was_not_measured(
    manifest: Path, tmp_path: Path, measured: int
) -> None:
    """An export's eye without its measurements: the report cites what there is, says the rest was not measured,
    and passes; the same report without that statement, or one citing a value that is missing, does not."""
    import dataclasses
    import math

    from training.manifest import write_manifest

    records = load_manifest(manifest)
    kept = {"cup_to_disc", "rnfl_average"}
    keep = sorted(kept)[:measured]
    bare = [
        dataclasses.replace(r, biomarkers={k: (v if k in keep else math.nan) for k, v in r.biomarkers.items()})
        for r in records
    ]
    bare_manifest = write_manifest(tmp_path / "bare" / "manifest.csv", bare)
    result = run_stage1(bare_manifest, tmp_path / "s1", GuidelineTeacher(), progress=False)
    assert result.summary["accepted"] == len(records) and result.summary["rejected"] == 0
    for record in (json.loads(line) for line in result.instructions.read_text().splitlines()):
        report = record["conversations"][1]["value"]
        assert "not measured" in report.split(". ")[0], report
        assert len(record["not_measured"]) == 37 - measured and not set(keep) & set(record["not_measured"])
        assert {c.biomarker_key for c in find_citations(report)} >= set(keep)  # every measured value cited
    eye, text = bare[0], GuidelineTeacher().write(bare[0])
    silent = text.split(". ", 1)[1]  # the statement of what was not measured taken out
    assert any("does not say what was not" in p for p in validate_report(silent, eye.label, eye.biomarkers))
    invented = "The cup-to-disc ratio is 0.45, the RNFL thickness 95.0 um and the GCIPL thickness 80.0 um. " + text
    if measured == 0:
        assert any("which has no value" in p for p in validate_report(invented, eye.label, eye.biomarkers))
