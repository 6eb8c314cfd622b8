"""Pipeline cache keys: a step is reused only when its resolved configuration and its code are unchanged."""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from training.cache_keys import source_digest
from training.pipeline import STEP_SOURCES, PipelineConfig, step_digests
from training.stage3.config import Stage3Config

STEPS = ("cohort", "stage1", "stage2", "base_llm", "stage3", "bundle")


def _digests(cfg: PipelineConfig) -> dict[str, str]:
    return step_digests(cfg)


def _changed(a: PipelineConfig, b: PipelineConfig) -> set[str]:
    da, db = _digests(a), _digests(b)
    return {step for step in STEPS if da[step] != db[step]}


def test_same_configuration_same_keys() -> None:
    assert _digests(PipelineConfig.small()) == _digests(PipelineConfig.small())


def test_any_resolved_field_counts_and_only_downstream_steps_rerun() -> None:
    base = PipelineConfig.small()
    assert _changed(base, replace(base, stage2_changes={"lr": 1e-3})) == {"stage2", "stage3", "bundle"}
    assert _changed(base, replace(base, stage2_epochs=3)) == {"stage2", "stage3", "bundle"}
    deep = replace(base.stage3, stand_in=replace(base.stage3.stand_in, jitter=0.25))  # a nested preset field
    assert _changed(base, replace(base, stage3=deep)) == {"stage3", "bundle"}
    assert _changed(base, replace(base, stage3=replace(base.stage3, decision_tokens=(8, 4)))) == {"stage3", "bundle"}
    assert _changed(base, replace(base, bundle_version="0.2.0")) == {"bundle"}
    # The benchmark calibrates on every validation subject, the demo on its first 16: two bundles, one stage 3.
    assert _changed(base, replace(base, calibration_subjects=0)) == {"bundle"}
    assert _changed(base, replace(base, seed=8)) == set(STEPS) - {"base_llm"}  # the LLM conversion is shared


def test_the_tiny_llm_pipeline_has_no_conversion_step() -> None:
    assert set(step_digests(PipelineConfig.tiny())) == set(STEPS) - {"base_llm"}
    with pytest.raises(ValueError, match="preset"):
        PipelineConfig.small(stage3=Stage3Config.small())


def test_bookkeeping_fields_do_not_invalidate_the_cache() -> None:
    base = PipelineConfig.small()
    assert _changed(base, replace(base, workers=1)) == set()
    assert _changed(base, replace(base, stage2_changes={"num_threads": 2, "eval_batch_size": 8})) == set()
    assert _changed(base, replace(base, stage3=replace(base.stage3, checkpoint_every=7, num_threads=1))) == set()


def test_a_source_change_changes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fake_step"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "build.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = source_digest(["fake_step"])
    assert source_digest(["fake_step.build"]) != before
    (package / "build.py").write_text("SCALE = 2\n")
    assert source_digest(["fake_step"]) != before
    sys.modules.pop("fake_step", None)


def test_every_step_names_code_that_exists() -> None:
    assert set(STEP_SOURCES) == set(STEPS)
    for modules in STEP_SOURCES.values():
        assert len(source_digest(modules)) == 64  # raises ModuleNotFoundError for a stale name


def test_stage3_key_covers_every_result_changing_field() -> None:
    """A field added to Stage3Config later is in the key unless it is declared bookkeeping."""
    base = PipelineConfig.small()
    changed = replace(base, stage3=Stage3Config.smollm(lora_dropout=0.1))
    assert _changed(base, changed) == {"stage3", "bundle"}
