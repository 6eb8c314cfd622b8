"""Configuration of the GROK model (docs/domain.md, The GROK model): encoders, projectors, language model, generation.

One dataclass tree, shared by training (stages 2 and 3), export and the runtime, and stored in every
bundle's manifest (`GrokConfig.to_dict()` / `from_dict()`). `GrokConfig.full()` is the paper's model;
`GrokConfig.tiny()` has the same shapes where they matter (224 px, patch 16, 196 tokens per modality)
but tiny widths, for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: ImageNet mean / std (RETFound and RetiZero were trained with them).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderConfig:
    """A timm VisionTransformer as RETFound / RetiZero build it (ViT-L/16 at full size)."""

    img_size: int = 224  # input side in pixels; both checkpoints were trained at 224
    patch_size: int = 16  # patch side; 224/16 = 14 -> 196 patch tokens
    embed_dim: int = 1024  # token width D (ViT-L: 1024)
    depth: int = 24  # number of transformer blocks (ViT-L: 24)
    num_heads: int = 16  # attention heads per block (ViT-L: 16)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * embed_dim
    norm_eps: float = 1e-6  # LayerNorm epsilon used by RETFound's models_vit
    lora_rank: int = 0  # rank of the q/v LoRA of the source checkpoint (RetiZero: 8; 0 = none). Merged at load.

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (196 at 224/16)."""
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ProjectorConfig:
    """The LLaVA-style projectors of docs/domain.md, The GROK model (encoder tokens -> LLM embeddings)."""

    vision_dim: int = 1024  # encoder token width (both encoders must agree)
    llm_hidden_size: int = 3584  # LLM embedding width H (Qwen2-7B: 3584)
    missing_modality: str = "learned"  # how an absent modality is fed: "learned" = one learned placeholder embedding
    token_grid: int = (
        0  # 0 = every patch token (196 per modality, the paper); k = average-pooled to k x k (CPU presets)
    )

    def tokens_per_image(self, num_patches: int) -> int:
        """Visual embeddings one image contributes after pooling."""
        return self.token_grid**2 if self.token_grid else num_patches


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 causal LM. Full size is read from its local directory; these fields build tiny test models
    and are checked against the loaded model (hidden_size)."""

    hidden_size: int = 3584  # embedding / residual width H
    num_hidden_layers: int = 28  # decoder layers
    num_attention_heads: int = 28  # query heads
    num_key_value_heads: int = 4  # KV heads (grouped-query attention)
    intermediate_size: int = 18944  # MLP width
    vocab_size: int = 152064  # rows of the embedding matrix (tokenizer size incl. added tokens, padded)
    max_position_embeddings: int = 32768  # longest supported sequence
    rope_theta: float = 1_000_000.0  # rotary base


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding defaults of the runtime (deterministic, bounded)."""

    # Hard bound on generated tokens per eye (the paper allows 1024): the 280 phantom teacher reports (<= 300
    # words) take up to 518 SmolLM2 tokens, so 512 would cut some; a cut report has no diagnosis line.
    max_new_tokens: int = 768
    temperature: float = 0.0  # 0 = greedy (deterministic); > 0 samples (the paper used 0.2)
    score_labels: bool = True  # also score each label after "Diagnosis:" (7 short continuations, one prefill)
    min_label_probability: float = 0.5  # without a valid diagnosis line, use the scored label only above this
    biomarkers_in_prompt: bool = True  # the prompt carries the head estimates block (must match stage-3 training)
    ground_numbers: bool = True  # write cited numbers that disagree with the estimates as the estimates
    compact_biomarkers: bool = False  # the prompt's estimates as grok_pacs.model.prompt.compact_biomarker_block
    pattern_subtype: bool = False  # the pattern line names the AMD subtype the estimates show (as trained)
    stop_at_diagnosis: bool = True  # end a generation once "Diagnosis: <label>" is complete (nothing after it)
    # No token n-gram of this size twice (0 = off). Healthy reports do repeat long runs (a rule-out citing
    # "is unlikely with an arteriolar-to-venular ratio of 0.768" twice: 20 SmolLM2 tokens), and blocking one
    # would force a different token, maybe a wrong digit; 32 only stops a loop that repeats whole sentences.
    no_repeat_ngram_size: int = 32
    repetition_penalty: float = 1.0  # 1.0 = off: a penalty would also punish the words and digits reports repeat
    max_number_digits: int = 6  # forbid a digit run longer than this and a second decimal point (0 = off)
    # Apply the validator's repetition rules while writing (grok_pacs.analysis.guards.PhraseGuard).
    phrase_guard: bool = True
    # A generation that fails the validator is written again, alone, this many times at most (0 = never):
    # sampled at retry_temperature from a seed fixed per eye (and retry_seed), never writing the subtype the
    # estimates contradict (grok_pacs.analysis.rewrite). The first attempt that passes is shipped. Each retry
    # costs one eye's generation (5-7 s on 2 CPU cores with the 135M stand-in); about 1 eye in 10 fails.
    retries: int = 2
    retry_temperature: float = 0.7
    retry_seed: int = 0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.retry_temperature <= 0:
            raise ValueError(
                f"generation: retries {self.retries} must be >= 0 and retry_temperature {self.retry_temperature} > 0"
            )
        if self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError(
                f"generation: max_new_tokens {self.max_new_tokens} must be >= 1 and temperature {self.temperature} >= 0"
            )
        if self.no_repeat_ngram_size < 0 or self.max_number_digits < 0 or self.repetition_penalty <= 0:
            raise ValueError(
                "generation: no_repeat_ngram_size and max_number_digits must be >= 0 (0 = off) and "
                f"repetition_penalty > 0; got {self.no_repeat_ngram_size}, {self.max_number_digits}, "
                f"{self.repetition_penalty}"
            )


@dataclass(frozen=True)
class GrokConfig:
    """The whole model: two encoders, projectors, the LLM and how the runtime decodes."""

    cfp_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(lora_rank=8))  # RetiZero (CFP)
    oct_encoder: EncoderConfig = field(default_factory=EncoderConfig)  # RETFound, stage-2 aligned (OCT)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)  # CFP and OCT projectors
    llm: LLMConfig = field(default_factory=LLMConfig)  # Qwen2-7B-Instruct
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # runtime decoding defaults
    image_token: str = "<image>"  # the one prompt token that the 196 + 196 visual embeddings replace
    max_length: int = 2048  # training sequence limit, visual embeddings included

    @classmethod
    def full(cls) -> GrokConfig:
        """The paper's model: ViT-L/16 encoders, Qwen2-7B (H = 3584)."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 512) -> GrokConfig:
        """Same token counts as the full model, tiny widths: builds and runs in a second on a CPU."""
        enc = EncoderConfig(embed_dim=32, depth=2, num_heads=2)
        llm = LLMConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            vocab_size=vocab_size,
            max_position_embeddings=2048,
            rope_theta=10_000.0,
        )
        return cls(
            cfp_encoder=EncoderConfig(embed_dim=32, depth=2, num_heads=2, lora_rank=4),
            oct_encoder=enc,
            projector=ProjectorConfig(vision_dim=32, llm_hidden_size=128),
            llm=llm,
            generation=GenerationConfig(max_new_tokens=80),
            max_length=2048,
        )

    @property
    def visual_tokens(self) -> int:
        """Visual embeddings spliced at the image token when both modalities are present (392)."""
        return self.projector.tokens_per_image(self.cfp_encoder.num_patches) + self.projector.tokens_per_image(
            self.oct_encoder.num_patches
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrokConfig:
        """Inverse of to_dict; unknown keys are an error that names them (a bundle from a newer version)."""
        parts = {
            "cfp_encoder": EncoderConfig,
            "oct_encoder": EncoderConfig,
            "projector": ProjectorConfig,
            "llm": LLMConfig,
            "generation": GenerationConfig,
        }
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GrokConfig fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                sub = parts[key]
                bad = set(value) - set(sub.__dataclass_fields__)
                if bad:
                    raise ValueError(f"unknown {key} fields: {sorted(bad)}")
                kwargs[key] = sub(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def check(self) -> None:
        """Shapes that must agree; raises ValueError naming the mismatch."""
        for name, enc in (("cfp_encoder", self.cfp_encoder), ("oct_encoder", self.oct_encoder)):
            if enc.embed_dim != self.projector.vision_dim:
                raise ValueError(
                    f"{name}.embed_dim {enc.embed_dim} != projector.vision_dim {self.projector.vision_dim}"
                )
            if enc.img_size % enc.patch_size:
                raise ValueError(f"{name}: img_size {enc.img_size} is not a multiple of patch_size {enc.patch_size}")
        if self.projector.llm_hidden_size != self.llm.hidden_size:
            raise ValueError(
                f"projector.llm_hidden_size {self.projector.llm_hidden_size} != llm.hidden_size {self.llm.hidden_size}"
            )
        if self.projector.missing_modality != "learned":
            raise ValueError(f"projector.missing_modality {self.projector.missing_modality!r}: only 'learned'")
