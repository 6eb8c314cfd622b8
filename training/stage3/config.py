"""Stage-3 configuration: one dataclass, two presets.

`paper()` is the paper's recipe (docs/domain.md, The GROK model: LoRA r=128, alpha=256, dropout 0.05 on
q/k/v/o/gate/up/down_proj,
lr 2e-4 with the projectors at 2e-5, 4 epochs, batch 8 x grad-accum 4, cosine with 3 % warmup, bf16, max
length 2048) on a real Qwen2-7B-Instruct from a local directory. `small()` trains on a CPU in minutes on the
phantom cohort: a tiny Qwen2 that the project pretrains itself (the stand-in of issue 9 item 2)
and a small BPE tokenizer. Pointing `base_llm_dir` at real weights skips the stand-in pretraining.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from grok_pacs.model.precision import PRECISIONS, cpu_precision

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Fields that may differ between a run and the run it resumes (they do not change what is computed: `shard`
#: changes only the floating-point reduction order, and both kinds write the same unsharded checkpoints).
RESUME_FREE_FIELDS = frozenset({"checkpoint_every", "eval_every", "num_threads", "shard"})
#: How `torchrun` ranks hold the model: "ddp" a whole copy each, "fsdp" a slice each (training.sharding).
SHARDS = ("ddp", "fsdp")


@dataclass(frozen=True)
class StandInLLMConfig:
    """The phantom's tiny Qwen2 base, pretrained as a causal LM on the stage-1 report text.

    A stand-in for Qwen2-7B-Instruct, which cannot be brought onto these machines: a LoRA on a randomly
    initialised LLM learns nothing useful, so the base first learns the language of the reports.
    """

    hidden_size: int = 128  # residual width
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # KV heads (grouped-query attention, as Qwen2)
    intermediate_size: int = 256  # MLP width
    epochs: int = 6  # passes over the report corpus (jittered copies included)
    lr: float = 3e-3  # AdamW learning rate (cosine, 5 % warmup)
    batch_size: int = 8  # sequences per step
    max_length: int = 2048  # longest pretraining sequence in tokens
    jittered_copies: int = 1  # extra teacher-written copies of each record with jittered values (guideline only)
    jitter: float = 0.5  # jitter in training-set standard deviations of each biomarker


@dataclass(frozen=True)
class Stage3Config:
    """Everything stage 3 needs besides its inputs (instruction records, encoders, heads)."""

    name: str = "small"  # preset name, recorded in the bundle provenance
    # --- language model and tokenizer -----------------------------------------------------------------
    base_llm_dir: Path | None = None  # local Qwen2(-Instruct) directory; None = pretrain the stand-in
    tokenizer_dir: Path | None = None  # tokenizer directory; None = base_llm_dir's, else train a phantom BPE
    tokenizer_vocab_size: int = 4096  # phantom BPE vocabulary (ignored with a real tokenizer)
    stand_in: StandInLLMConfig = field(default_factory=StandInLLMConfig)  # used only without base_llm_dir
    # --- LoRA ------------------------------------------------------------------------------------------
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # Qwen2 linear layers that get adapters
    # --- optimisation ----------------------------------------------------------------------------------
    lr: float = 2e-3  # LoRA learning rate
    projector_lr: float = 2e-3  # projector learning rate
    weight_decay: float = 0.0  # AdamW weight decay (LoRA and projectors)
    epochs: int = 4  # passes over the training records
    batch_size: int = 4  # records per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    warmup_ratio: float = 0.03  # fraction of optimiser steps with linear warmup, then cosine to 0
    max_grad_norm: float = 1.0  # gradient clipping
    # "auto" = bf16 autocast on CUDA with bf16 support, else fp32; "bf16" forces it (on CUDA, or on a CPU with
    # AMX bf16 tiles, where oneDNN multiplies bf16 natively); "fp32" never autocasts
    precision: str = "auto"
    max_length: int = 2048  # sequence limit in tokens, the visual embeddings included; longer targets are cut
    gradient_checkpointing: bool = False  # recompute activations in backward (saves memory, costs time)
    decision_weight: float = 1.0  # loss weight of the reply's first and last tokens (1 = plain SFT)
    decision_tokens: tuple[int, int] = (12, 4)  # how many first / last reply tokens get decision_weight
    # --- prompt ----------------------------------------------------------------------------------------
    biomarker_estimates: bool = False  # give the LLM the heads' estimates as text (trained on predictions)
    compact_biomarkers: bool = False  # the estimates as the compact block (short names, low/high flags)
    concise_reports: bool = False  # guideline targets: flagged estimates, lesions, inference, conclusion (~60 words)
    pattern_head: bool = False  # fit the decision classifier (training.stage3.crossfit); its label ends the prompt
    pattern_subtype: bool = False  # that line also names the AMD subtype the estimates show ("AMD (dry)")
    # With pattern_head: the decision classifier (training.stage3.crossfit) replaces the pattern head; its
    # operating point is chosen on the validation eyes for at most this error among stated labels
    decision_target_error: float = 0.05
    token_grid: int = 0  # visual tokens per modality pooled to token_grid x token_grid (0 = all 196, the paper)
    max_new_tokens: int = 512  # the bundle's decoding bound per eye
    max_train_records: int = 0  # SFT on at most this many training eyes, labels balanced (0 = all)
    max_val_records: int = 0  # validation loss on at most this many eyes, labels balanced (0 = all)
    # --- bookkeeping -----------------------------------------------------------------------------------
    seed: int = 0  # data order, LoRA init, dropout
    checkpoint_every: int = 0  # optimiser steps between checkpoints; 0 = once per epoch
    eval_every: int = 0  # optimiser steps between validation-loss evaluations; 0 = once per epoch
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's default
    # Under torchrun: "ddp" replicates the model on every rank; "fsdp" shards the frozen base, the LoRA and
    # the projectors over the ranks (FSDP2), for a base that does not fit one GPU beside its activations
    shard: str = "ddp"

    def __post_init__(self) -> None:
        if self.shard not in SHARDS:
            raise ValueError(f"shard {self.shard!r}: expected one of {SHARDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "grad_accum", "max_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("token_grid", "max_train_records", "max_val_records"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.pattern_head and not (self.biomarker_estimates and self.compact_biomarkers):
            raise ValueError("pattern_head needs biomarker_estimates and compact_biomarkers (its line ends that block)")
        if self.pattern_subtype and not self.pattern_head:
            raise ValueError("pattern_subtype needs pattern_head (the subtype is part of its line)")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora_targets {sorted(unknown)} are not Qwen2 linear layers {LORA_TARGETS}")

    @classmethod
    def small(cls, **overrides: Any) -> Stage3Config:
        """CPU, phantom cohort, minutes: tiny stand-in Qwen2, phantom BPE, fp32."""
        return replace(cls(), **overrides)

    @classmethod
    def smollm(cls, **overrides: Any) -> Stage3Config:
        """CPU, phantom cohort: the pretrained SmolLM2-135M-Instruct stand-in (the pipeline converts it and sets
        `base_llm_dir`), sized for `make demo` on 2 cores.

        Measured there (docs/domain.md, Stand-in language model) a LoRA forward+backward costs 3.6 s per 256 tokens and
        8.7 s per 700, so every
        token counts: visual tokens pooled to 3 x 3 per modality (18 instead of 392), the compact biomarker
        block (the 16 signature biomarkers and any other flagged estimate: about 320 SmolLM2 tokens instead of
        750) and concise target reports (the flagged estimates, lesions, inference, conclusion: about 140
        tokens instead of 420) leave about 480 tokens a sample. One epoch over 140 training eyes (labels
        balanced) at batch 1, LoRA r 16 on every linear layer, lr 1e-3, validation loss on 8 eyes. No LoRA
        dropout: in one epoch no sample is seen twice, so it regularises nothing, and on the CPU its masks
        (aten::bernoulli_ on every LoRA input, 210 per step) were 23 % of a step's time: a step of 480 tokens
        costs 2.4 s without it and 4.2 s with it (torch profiler, 2 cores). On a CPU with AMX bf16 tiles (Intel
        Sapphire Rapids and later, as the CI machine) the step runs under bf16 autocast, as the paper's GPU
        recipe does: 1.4 s instead of 2.4 s; the weights, the LoRA, the optimiser and the loss stay fp32.
        Elsewhere bf16 is emulated and slower, so the preset keeps fp32 there (`cpu_precision`).
        Chosen on the 70-subject demo cohort of seed 7 (docs/training.md): the full-length reports looped
        under greedy decoding at lr 5e-4 and 2e-3. The pattern head
        (grok_pacs.model.pattern) names the label the estimates resemble most in the prompt: one epoch over 140
        eyes teaches the report's form, not the 7-way mapping from the estimates to a label.
        """
        base = cls(
            name="smollm",
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,  # one epoch: see above
            lr=1e-3,
            projector_lr=1e-3,
            epochs=1,
            batch_size=1,
            grad_accum=1,
            warmup_ratio=0.05,
            precision=cpu_precision(),  # bf16 autocast where the CPU has AMX tiles: see above
            max_length=1536,  # counts 392 visual positions (the pooled 18 are fewer): room for any report
            biomarker_estimates=True,
            compact_biomarkers=True,
            concise_reports=True,
            pattern_head=True,
            pattern_subtype=True,
            token_grid=3,
            max_new_tokens=320,
            max_train_records=140,
            max_val_records=8,
        )
        overrides.setdefault("pattern_head", overrides.get("biomarker_estimates", True))  # it reads the estimates
        overrides.setdefault("pattern_subtype", overrides["pattern_head"])
        return replace(base, **overrides)

    @classmethod
    def paper(cls, base_llm_dir: Path | None = None, **overrides: Any) -> Stage3Config:
        """The paper's recipe on a real local Qwen2-7B-Instruct (GPU, bf16)."""
        base = cls(
            name="paper",
            base_llm_dir=Path(base_llm_dir) if base_llm_dir else None,
            lora_r=128,
            lora_alpha=256,
            lora_dropout=0.05,
            lr=2e-4,
            projector_lr=2e-5,
            epochs=4,
            batch_size=8,
            grad_accum=4,
            warmup_ratio=0.03,
            precision="bf16",
            max_length=2048,
            gradient_checkpointing=True,
        )
        return replace(base, **overrides)

    @property
    def uses_stand_in(self) -> bool:
        """True when the LLM base is the project's own pretrained tiny Qwen2 (no real weights given)."""
        return self.base_llm_dir is None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("base_llm_dir", "tokenizer_dir"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["lora_targets"] = list(self.lora_targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage3Config:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Stage3Config fields: {sorted(unknown)}")
        values = dict(data)
        for key in ("base_llm_dir", "tokenizer_dir"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if "stand_in" in values and isinstance(values["stand_in"], dict):
            values["stand_in"] = StandInLLMConfig(**values["stand_in"])
        for key in ("lora_targets", "decision_tokens"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def digest(self) -> str:
        """A short hash of the settings that change the result."""
        data = {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE_FIELDS}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


PRESETS = {"small": Stage3Config.small, "smollm": Stage3Config.smollm, "paper": Stage3Config.paper}
