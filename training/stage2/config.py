"""Stage-2 configuration: one dataclass, saved as JSON beside every checkpoint.

The paper's recipe: docs/domain.md, The GROK model, stage 2.

Presets:
- `small()`: the CPU demo / benchmark run (tiny ViT of `GrokConfig.tiny()`, a few minutes at most on 2 cores).
- `paper()`: the paper's recipe on ViT-L (RETFound init, projector to 1024, NT-Xent at 0.5, AdamW 1e-4,
  batch 32, 50 epochs), bf16 on a GPU; standardised biomarkers and optional augmentation are our fixes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from grok_pacs.domain.biomarkers import CFP_KEYS, OCT_KEYS
from grok_pacs.model.config import EncoderConfig, GrokConfig

MODALITIES = ("OCT", "CFP")
MODEL_PRESETS = ("tiny", "full")
SELECT_METRICS = ("val_probe_mae", "val_loss")
CONFIG_NAME = "stage2-config.json"
#: Fields that may differ between a run and the run it resumes (they do not change what is computed).
RESUME_FREE_FIELDS = frozenset(
    {"out_dir", "manifest", "cache_dir", "device", "progress", "num_threads", "eval_batch_size", "resume"}
)


@dataclass
class Stage2Config:
    """Everything a stage-2 run depends on; `out_dir` receives checkpoints, logs, report and heads."""

    manifest: str = ""  # cohort manifest CSV (training/manifest.py format)
    out_dir: str = ""  # run folder: checkpoints, metrics.jsonl, curve.png, eval.json/.md, heads
    cache_dir: str = ""  # preprocessed-image cache ("" = <out_dir>/cache); may be shared with stage 3
    modality: str = "OCT"  # "OCT": foveal B-scan + 31 OCT biomarkers; "CFP": fundus photo + 6 CFP biomarkers
    model_preset: str = "tiny"  # encoder shape from GrokConfig.tiny() or GrokConfig.full()
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # EncoderConfig fields to change
    init_checkpoint: str = ""  # RETFound / RetiZero .pth to start from ("" = random init with `seed`)
    proj_dim: int = 1024  # shared embedding width of image projector and biomarker encoder
    bio_hidden: int = 128  # biomarker encoder hidden width
    loss: str = "ntxent"  # "clip" (symmetric InfoNCE) or "ntxent" (the paper's)
    temperature: float = 0.5  # loss temperature (initial value when learned)
    learn_temperature: bool = False  # learn the temperature (CLIP's logit scale)
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4  # AdamW learning rate of projector, biomarker encoder and temperature
    encoder_lr: float = 1e-4  # AdamW learning rate of the image encoder
    weight_decay: float = 0.05
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 0 (per step)
    augment: bool = False  # random shift, contrast/brightness jitter and noise on training images
    # acquisition variation (exposure, gamma, colour cast, blur, noise/speckle, JPEG) on training images: what
    # another camera or OCT changes (training.stage2.data.augment_acquisition; docs/training.md, Device shift)
    augment_acquisition: bool = False
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    select_metric: str = "val_probe_mae"  # what "best" means: probe MAE or contrastive loss on val
    ridge_alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # chosen by CV on train
    # The biomarker head reads the pooled feature and the mean tokens of a head_grid x head_grid partition of
    # the patch grid (0: pooled only): sector thicknesses and the cup's place need where, not only what.
    head_grid: int = 4
    eval_batch_size: int = 64
    num_threads: int = 0  # torch CPU threads (0 = leave torch's default)
    progress: bool = True  # tqdm progress bars
    resume: bool = True  # continue from <out_dir>/last.safetensors when it exists

    def __post_init__(self) -> None:
        self.ridge_alphas = tuple(float(a) for a in self.ridge_alphas)
        self.encoder_overrides = dict(self.encoder_overrides)

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def small(cls, manifest: str = "", out_dir: str = "", modality: str = "OCT", **changes: Any) -> Stage2Config:
        """The CPU demo/benchmark run: tiny ViT, short schedule, tuned to beat the plain encoder reliably."""
        base = cls(
            manifest=manifest,
            out_dir=out_dir,
            modality=modality,
            model_preset="tiny",
            proj_dim=128,
            loss="ntxent",
            temperature=0.5,
            epochs=20,
            batch_size=32,
            lr=2e-3,
            encoder_lr=2e-3,
            weight_decay=0.05,
            warmup_epochs=1,
            augment=False,
            num_threads=1,
        )
        return replace(base, **changes)

    @classmethod
    def paper(cls, manifest: str = "", out_dir: str = "", modality: str = "OCT", **changes: Any) -> Stage2Config:
        """The paper's recipe on ViT-L (GPU, bf16); pass init_checkpoint=RETFound's .pth."""
        base = cls(
            manifest=manifest,
            out_dir=out_dir,
            modality=modality,
            model_preset="full",
            proj_dim=1024,
            loss="ntxent",
            temperature=0.5,
            epochs=50,
            batch_size=32,
            lr=1e-4,
            encoder_lr=1e-4,
            augment_acquisition=True,
        )
        return replace(base, **changes)

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def image_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out_dir) / "cache"

    @property
    def biomarker_keys(self) -> tuple[str, ...]:
        return OCT_KEYS if self.modality == "OCT" else CFP_KEYS

    def encoder_config(self) -> EncoderConfig:
        grok = GrokConfig.tiny() if self.model_preset == "tiny" else GrokConfig.full()
        enc = grok.oct_encoder if self.modality == "OCT" else grok.cfp_encoder
        # lora_rank describes the source checkpoint (RetiZero's LoRA is merged at load): the ViT is plain.
        return replace(enc, **self.encoder_overrides)

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        choices = {
            "modality": MODALITIES,
            "model_preset": MODEL_PRESETS,
            "loss": ("clip", "ntxent"),
            "select_metric": SELECT_METRICS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"stage-2 config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        bad_enc = set(self.encoder_overrides) - {f.name for f in fields(EncoderConfig)}
        if bad_enc:
            raise ValueError(f"stage-2 config: unknown encoder_overrides {sorted(bad_enc)}")
        for name in ("epochs", "batch_size", "proj_dim", "bio_hidden", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage-2 config: {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("stage-2 config: batch_size must be >= 2 (a contrastive batch needs negatives)")
        if not self.temperature > 0 or not self.lr > 0 or not self.encoder_lr >= 0:
            raise ValueError("stage-2 config: temperature and lr must be > 0, encoder_lr >= 0")
        side = self.encoder_config().img_size // self.encoder_config().patch_size
        if not 0 <= self.head_grid <= side:
            raise ValueError(
                f"stage-2 config: head_grid must be in 0..{side} (the patch grid side), got {self.head_grid}"
            )
        if not self.ridge_alphas or min(self.ridge_alphas) <= 0:
            raise ValueError("stage-2 config: ridge_alphas must be a non-empty list of values > 0")

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ridge_alphas"] = list(self.ridge_alphas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage2Config:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown stage-2 config fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path | str) -> Stage2Config:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read stage-2 config {path}: {exc}") from exc
        return cls.from_dict(data)
