"""The whole pipeline: cohort -> stage 1 -> stage 2 (OCT and CFP) -> stage 3 -> bundle, cached.

The cohort is the phantom generator's (the default, `make demo`'s) or any manifest given with `--manifest`
(docs/cohort-manifest.md; `python -m training.cohort from-dicom` builds one from a PACS export): the
generator is one producer of manifests. A given manifest is keyed by its sha256, so editing it re-runs
everything after it; its images are not hashed (replace an image under the same name in a new manifest or
a new cache). The bundle records the cohort's fingerprint and the code's commit.

Every step writes into a folder named by the hash of everything it depends on (its own settings and the
hashes of the steps before it) and marks itself complete with `DONE.json`; a step whose folder is complete
is skipped. So a second run with the same configuration is instant, a changed stage-3 setting re-runs only
stage 3 and the bundle, and an interrupted run continues where it stopped (stages 2 and 3 resume from
their checkpoints). A file lock keeps two processes (say `make demo` and its test) from building the same
cache at once: the second waits and then reuses the first one's result.

This module runs the steps (the lock, the cached step folders, each step's build); the settings and what
keys each step's folder are in training/pipeline_config.py (`PipelineConfig`, `STEP_SOURCES`, `step_digests`,
importable from here too). CLI: `python -m training.pipeline --help` (training/pipeline_cli.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import runpy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from training.pipeline_config import DECIDERS, PRESETS, STEP_SOURCES, PipelineConfig, step_digests
from training.stage2.config import MODALITIES
from training.stage3.config import Stage3Config

#: What this module offers: its own runner, and the settings and keys (training.pipeline_config) its callers
#: have always imported from here.
__all__ = [
    "DECIDERS",
    "DEFAULT_CACHE",
    "DONE",
    "PRESETS",
    "STEP_SOURCES",
    "PipelineConfig",
    "PipelineResult",
    "quiet_exporter_logs",
    "run_pipeline",
    "step_digests",
]

log = logging.getLogger(__name__)

DONE = "DONE.json"
DEFAULT_CACHE = Path(".cache") / "pipeline"


@dataclass(frozen=True)
class PipelineResult:
    manifest: Path
    instructions: Path
    stage2: dict[str, dict[str, str]]  #: modality -> {"encoder", "head", "report"}
    stage3_dir: Path
    bundle: Path
    timings_s: dict[str, float]  #: seconds per step in this run (0 when reused from the cache)
    reused: dict[str, bool]  #: step -> came from the cache

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@contextmanager
def _lock(cache_dir: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder for the duration of a pipeline run."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle = (cache_dir / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


class _Steps:
    """Runs steps into hashed folders, skipping completed ones, recording timings."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.timings: dict[str, float] = {}
        self.reused: dict[str, bool] = {}

    def run(self, name: str, digest: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        folder = self.cache_dir / f"{name}-{digest}"
        done = folder / DONE
        if done.is_file():
            self.timings[name], self.reused[name] = 0.0, True
            log.info("pipeline: %s reused from %s", name, folder)
            return folder, json.loads(done.read_text())
        started = time.monotonic()
        folder.mkdir(parents=True, exist_ok=True)
        outputs = build(folder)
        self.timings[name] = round(time.monotonic() - started, 1)
        self.reused[name] = False
        outputs["seconds"] = self.timings[name]
        done.write_text(json.dumps(outputs, indent=1, default=str))
        return folder, outputs


def run_pipeline(cfg: PipelineConfig, cache_dir: Path = DEFAULT_CACHE, *, progress: bool = True) -> PipelineResult:
    """Build (or reuse) every step; returns the paths of the cohort, the stages' outputs and the bundle."""
    cache_dir = Path(cache_dir).resolve()
    with _lock(cache_dir):
        return _run_locked(cfg, cache_dir, progress)


def _run_locked(cfg: PipelineConfig, cache_dir: Path, progress: bool) -> PipelineResult:
    steps, d = _Steps(cache_dir), step_digests(cfg)
    _, cohort = steps.run("cohort", d["cohort"], lambda out: _cohort(cfg, out, progress))
    # A given manifest is read where it is now (its cached record may name where it was when first keyed).
    manifest = Path(cfg.manifest).resolve() if cfg.manifest else Path(cohort["manifest"])
    _, stage1 = steps.run("stage1", d["stage1"], lambda out: _stage1(manifest, out, progress))
    images = cache_dir / f"images-{d['cohort']}"
    _, stage2 = steps.run("stage2", d["stage2"], lambda out: _stage2(cfg, manifest, images, out, progress))
    stage3_cfg = cfg.stage3_config()
    if "base_llm" in d:
        _, base = steps.run("base_llm", d["base_llm"], _convert_smollm)
        stage3_cfg = replace(stage3_cfg, base_llm_dir=Path(base["qwen2"]))
    inputs = _stage3_inputs(stage1, stage2, manifest, images)
    stage3_dir, _ = steps.run("stage3", d["stage3"], lambda out: _stage3(stage3_cfg, inputs, out, progress))
    keyed = cohort["fingerprint"]["manifest_sha256"] if cfg.manifest else ""
    _, bundle = steps.run("bundle", d["bundle"], lambda out: _bundle(cfg, stage3_dir, inputs, out, progress, keyed))
    return PipelineResult(
        manifest,
        Path(stage1["instructions"]),
        stage2["modalities"],
        stage3_dir,
        Path(bundle["bundle"]),
        steps.timings,
        steps.reused,
    )


def _cohort(cfg: PipelineConfig, out: Path, progress: bool) -> dict[str, Any]:
    if cfg.manifest:  # a given cohort: checked as the stages check it (every problem at once) and fingerprinted
        from training.cohort.fingerprint import cohort_fingerprint

        fingerprint = cohort_fingerprint(Path(cfg.manifest))
        (out / "cohort.json").write_text(json.dumps(fingerprint, indent=1) + "\n")
        return {"manifest": str(Path(cfg.manifest).resolve()), "fingerprint": fingerprint}
    from training.phantom import generate_cohort

    manifest = generate_cohort(
        out,
        cfg.n_subjects,
        cfg.seed,
        dicom=cfg.dicom,
        dicom_splits=cfg.dicom_splits,
        workers=cfg.workers,
        progress=progress,
        devices=tuple(cfg.devices),
    )
    return {"manifest": str(manifest), "n_subjects": cfg.n_subjects, "seed": cfg.seed}


def _stage1(manifest: Path, out: Path, progress: bool) -> dict[str, Any]:
    from training.stage1.run import run_stage1
    from training.stage1.teachers.guideline import GuidelineTeacher

    result = run_stage1(manifest, out, GuidelineTeacher(), progress=progress)
    if result.summary["rejected"]:
        log.warning(
            "stage 1: %d of %d reports rejected (see %s)",
            result.summary["rejected"],
            result.summary["eyes"],
            result.rejected,
        )
    return {"instructions": str(result.instructions), "summary": result.summary}


def _stage2(cfg: PipelineConfig, manifest: Path, images: Path, out: Path, progress: bool) -> dict[str, Any]:
    """The two modalities one after the other. At once (one process each) was slower on 2 cores, 173 s
    against 98-139 s: their preprocessing pools (2 processes each) and evaluations (2 threads each) contend."""
    from training.stage2.train import run

    modalities = {}
    for modality in MODALITIES:
        s2 = cfg.stage2_config(
            modality,
            manifest=str(manifest),
            out_dir=str(out / modality.lower()),
            cache_dir=str(images),
            progress=progress,
        )
        result = run(s2)
        modalities[modality] = {
            "encoder": str(result.encoder_path),
            "head": str(result.heads_path),
            "report": str(result.report_path),
        }
    return {"modalities": modalities}


def _stage3_inputs(stage1: dict, stage2: dict, manifest: Path, images: Path) -> Any:
    from training.stage3.result import Stage3Inputs

    m = stage2["modalities"]
    return Stage3Inputs(
        Path(stage1["instructions"]),
        manifest,
        Path(m["CFP"]["encoder"]),
        Path(m["OCT"]["encoder"]),
        Path(m["CFP"]["head"]),
        Path(m["OCT"]["head"]),
        images,
    )


def _convert_smollm(out: Path) -> dict[str, Any]:
    from training.stage3.smollm import convert

    return {"qwen2": str(convert(out / "qwen2"))}


def _stage3(stage3: Stage3Config, inputs: Any, out: Path, progress: bool) -> dict[str, Any]:
    from training.stage3.run import run

    result = run(stage3, inputs, out, progress=progress)
    return {
        "report": str(out / "stage3.json"),
        "merged_llm": str(result.merged_llm_dir),
        "val_loss": [result.report["first_val_loss"], result.report["last_val_loss"]],
    }


def _bundle(
    cfg: PipelineConfig, stage3_dir: Path, inputs: Any, out: Path, progress: bool, keyed_sha256: str = ""
) -> dict[str, Any]:
    from training.cohort.fingerprint import code_commit, cohort_fingerprint
    from training.stage3.bundle import pack_bundle
    from training.stage3.result import load_result

    fingerprint = cohort_fingerprint(inputs.manifest)
    if keyed_sha256 and fingerprint["manifest_sha256"] != keyed_sha256:  # edited after the run was keyed
        raise RuntimeError(f"{inputs.manifest} changed during the run: run the pipeline again")
    if cfg.manifest:
        pipeline = {"manifest": str(inputs.manifest), "preset": cfg.preset, "llm": cfg.llm}
    else:
        pipeline = {"n_subjects": cfg.n_subjects, "seed": cfg.seed}
    bundle = pack_bundle(
        load_result(stage3_dir),
        inputs,
        out / "bundle",
        name=cfg.bundle_name,
        version=cfg.bundle_version,
        provenance={"pipeline": pipeline, "cohort": fingerprint, "code": code_commit()},
        progress=progress,
    )
    outputs: dict[str, Any] = {"bundle": str(bundle)}
    if cfg.calibrate:
        from training.stage3.calibrate import calibrate_bundle

        calibration = calibrate_bundle(
            bundle,
            inputs.manifest,
            "val",
            max_subjects=cfg.calibration_subjects,
            method=cfg.calibration_method,
            progress=progress,
        )
        outputs["calibration"] = calibration.to_dict()
    if cfg.estimate_error_quantile:
        from training.estimate_error import add_to_bundle as add_errors
        from training.estimate_error import fit_estimate_errors

        errors = fit_estimate_errors(bundle, inputs.manifest, cfg.estimate_error_quantile)
        add_errors(bundle, errors)
        outputs["estimate_error"] = {"quantile": errors.quantile, "n_eyes": errors.n_eyes}
    if cfg.ood_quantile:  # last: the calibration above runs without it, as it did before
        from training.ood import add_to_bundle, fit_ood

        model, outputs["ood"] = fit_ood(bundle, inputs.manifest, cfg.ood_quantile)
        add_to_bundle(bundle, model)
    return outputs


def quiet_exporter_logs() -> None:
    """The ONNX exporter's INFO chatter (a line per deduplicated initializer) off a user's terminal."""
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    # `python -m training.pipeline`: the command line is training.pipeline_cli, run by name so that this
    # module (the steps) never imports its own front end.
    runpy.run_module("training.pipeline_cli", run_name="__main__", alter_sys=True)
