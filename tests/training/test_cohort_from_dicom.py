"""`python -m training.cohort from-dicom` on a messy PACS export, and `training.pipeline --manifest` planning on it.

The export is built by tests.helpers.messy_export from the tests' ophthalmic DICOM builders: 11 labelled patients
(both eyes, CFP + OCT), with every problem a real export has planted once, each expected in the report with its
reason. Nothing is trained here (the plan mode shows which cohort the pipeline would use and its cache keys);
tests/training/test_retrain_end_to_end.py trains on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grok_pacs.domain.biomarkers import BIOMARKERS
from tests.helpers.messy_export import from_dicom_argv
from training import pipeline
from training.cohort.__main__ import main as cohort_main
from training.cohort.fingerprint import code_commit
from training.cohort.pseudonym import pseudonym
from training.manifest import load_manifest
from training.pipeline_cli import config_from_args, parse_args
from training.pipeline_cli import main as pipeline_main


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    argv, info = from_dicom_argv(tmp_path_factory.mktemp("cohort"))
    assert cohort_main(argv) == 0
    return info


def test_every_planted_problem_is_reported_with_its_reason_and_nothing_else_is_lost(built: dict) -> None:
    report = json.loads((built["out"] / "cohort-report.json").read_text())
    by_item = {(u["source"], u["item"]): u["reason"] for u in report["unused"]}
    exported = {k[1]: v for k, v in by_item.items() if k[0] == "export"}
    assert exported == built["planted"]
    assert sum(u["source"] == "export" for u in report["unused"]) == len(exported)  # each file reported once
    rows = {f"{k[0]}:{k[1]}": v for k, v in by_item.items() if k[0] != "export"}
    assert rows == built["expected_rows"]
    counts = report["counts"]
    n_files = sum(1 for p in built["export"].rglob("*") if p.is_file())
    assert counts["files_scanned"] == n_files == counts["files_used"] + counts["files_unused"]
    assert counts["eyes"] == 11 * 2 + 2  # patients 12 and 13 keep their complete left eyes


def test_the_manifest_is_valid_pseudonymised_and_split_by_subject(built: dict) -> None:
    manifest = built["out"] / "manifest.csv"
    records = load_manifest(manifest)
    # The manifest and the cohort description name nobody (the report names export files by their path,
    # which is how the team finds them: it stays with the export's identifiable images).
    text = manifest.read_text() + (built["out"] / "cohort.json").read_text()
    for p in built["patients"]:
        for value in (p.patient_id, p.patient_name, p.birth_date, p.patient_name.split("^")[0]):
            assert value not in text
    salt = built["salt"].read_text().strip().encode()
    assert salt.decode() not in text
    subjects = {pseudonym(salt, p.patient_id) for p in built["patients"][:13]}
    assert {r.subject_id for r in records} == subjects
    split_of = {}
    for r in records:
        assert split_of.setdefault(r.subject_id, r.split) == r.split  # both eyes of a subject in one split
    assert set(split_of.values()) == {"train", "val", "test"}
    first = next(r for r in records if r.subject_id == pseudonym(salt, built["patients"][0].patient_id))
    missing = sum(1 for v in first.biomarkers.values() if v != v)
    assert 0 < missing < len(BIOMARKERS)  # measurements carried, the rest missing (NaN)
    assert all(r.fovea_frame is not None for r in records)  # the runtime's selection found every pit


def test_a_rerun_into_the_same_folder_is_refused(built: dict, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "from-dicom",
        str(built["export"]),
        "--labels",
        str(built["tmp"] / "labels.csv"),
        "--out",
        str(built["out"]),
    ]
    assert cohort_main([*argv, "--salt-file", str(built["salt"])]) == 2
    assert "not empty" in capsys.readouterr().err
    inside = ["--salt-file", str(built["tmp"] / "new" / "salt")]
    argv[-1] = str(built["tmp"] / "new")
    assert cohort_main([*argv, *inside]) == 2
    assert "outside the output" in capsys.readouterr().err


def test_the_pipeline_plans_on_the_given_manifest(built: dict, capsys: pytest.CaptureFixture) -> None:
    manifest = built["out"] / "manifest.csv"
    cache = built["tmp"] / "pipeline-cache"
    assert pipeline_main(["--manifest", str(manifest), "--cache", str(cache), "--plan", "--quiet"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cohort"]["manifest"] == str(manifest.resolve())
    fingerprint = plan["cohort"]["fingerprint"]
    assert fingerprint["eyes"] == 24 and sum(fingerprint["eyes_per_split"].values()) == 24
    assert fingerprint["devices"]  # the devices named by the images' headers
    phantom = pipeline.step_digests(pipeline.PipelineConfig.small())
    assert plan["steps"]["cohort"]["key"] != phantom["cohort"]
    assert not any(step["cached"] for step in plan["steps"].values())
    assert not cache.exists() or not any(cache.iterdir())  # planning builds nothing
    # Another manifest (one eye fewer) is another cohort: every step's key changes.
    lines = manifest.read_text().splitlines()
    other = built["out"] / "manifest-fewer.csv"  # beside the first: the same relative image paths
    other.write_text("\n".join(lines[:-1]) + "\n")
    assert pipeline_main(["--manifest", str(other), "--cache", str(cache), "--plan"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(second["steps"][s]["key"] != plan["steps"][s]["key"] for s in ("cohort", "stage1", "stage2", "bundle"))


def test_the_demo_command_line_keeps_the_demo_configuration() -> None:
    """devtools/demo.py's command line resolves to the configuration (and cache keys) the demo always had."""
    demo = config_from_args(parse_args(["--cache", "c", "--json-out", "o.json"]))
    assert demo == pipeline.PipelineConfig.small()
    assert demo.step_config("cohort") == {"n": 210, "seed": 7, "dicom": True, "dicom_splits": ("test",)}
    assert pipeline.step_digests(demo) == pipeline.step_digests(pipeline.PipelineConfig.small())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "paper"], "--llm DIR"),
        (["--oct-encoder", "x.pth"], "--preset paper"),
        (["--llm", "no-such-dir"], "model directory"),
        (["--manifest", "no-such.csv"], "no file"),
    ],
)
def test_the_pipeline_refuses_options_that_cannot_work(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_paper_options_reach_the_stage_configurations(built: dict, tmp_path: Path) -> None:
    weights = tmp_path / "RETFound.pth"
    weights.write_bytes(b"not read when planning")
    llm = tmp_path / "qwen2-7b"
    llm.mkdir()
    argv = ["--manifest", str(built["out"] / "manifest.csv"), "--preset", "paper", "--oct-encoder", str(weights)]
    cfg = config_from_args(parse_args([*argv, "--llm", str(llm)]))
    oct_cfg, cfp_cfg = cfg.stage2_config("OCT"), cfg.stage2_config("CFP")
    assert (oct_cfg.model_preset, oct_cfg.init_checkpoint, cfp_cfg.init_checkpoint) == ("full", str(weights), "")
    assert (cfg.llm, cfg.stage3.name, cfg.stage3.base_llm_dir) == ("local", "paper", llm)
    assert "base_llm" not in pipeline.step_digests(cfg)  # a local model is used as it is, not converted


def test_an_export_with_nothing_usable_still_reports_every_file(built: dict, capsys) -> None:
    labels = built["tmp"] / "ghost-labels.csv"
    labels.write_text("patient_id,eye,label\nGHOST-0001,,AMD\n")
    out = built["tmp"] / "nothing"
    argv = ["from-dicom", str(built["export"]), "--labels", str(labels), "--out", str(out)]
    assert cohort_main([*argv, "--salt-file", str(built["salt"])]) == 2
    captured = capsys.readouterr()
    assert "no usable eye" in captured.err and "no label" in captured.out
    report = json.loads((out / "cohort-report.json").read_text())
    assert len({u["item"] for u in report["unused"] if u["source"] == "export"}) == report["counts"]["files_scanned"]
    assert not (out / "manifest.csv").exists()


def test_the_commit_is_unknown_outside_a_checkout(tmp_path: Path) -> None:
    assert code_commit(tmp_path) == {"commit": "unknown", "dirty": None}
    here = code_commit()
    assert len(here["commit"]) == 40 and isinstance(here["dirty"], bool)
