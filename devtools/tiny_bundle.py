"""A tiny, complete model bundle built through the real export path (test scaffolding only).

Tiny timm ViTs written as a RETFound `.pth` and a RetiZero `.pth` (LoRA unmerged) and loaded back with the
runtime's checkpoint loaders; a tiny Qwen2 with a BPE tokenizer trained here (ChatML tokens and <image>);
`export.build_bundle` exports, checks parity, hashes and verifies. The LLM is fitted for a few seconds to
answer with TINY_REPORT, so end-to-end tests see a real findings paragraph and diagnosis line. A fixed
decision classifier (`tiny_decision`, decision.json) decides TINY_LABEL at probability 0.8, which the
findings conclude: the runtime states it as a real bundle's classifier label.
"""

from __future__ import annotations

import argparse
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from export.build_bundle import BundleOptions, ModelParts, build_bundle
from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, CFP_KEYS, OCT_KEYS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from grok_pacs.model.checkpoints import load_retfound, load_retizero
from grok_pacs.model.config import GrokConfig
from grok_pacs.model.decision import DecisionClassifier
from grok_pacs.model.grok import GrokModel
from grok_pacs.model.heads import BiomarkerHead
from grok_pacs.model.pattern import PatternHead
from grok_pacs.model.projector import Projectors
from grok_pacs.model.prompt import IM_END, IMAGE_TOKEN, build_prompt, build_training_example, format_target
from grok_pacs.model.vit import LoraQKV, apply_qkv_lora, build_encoder

ENDOFTEXT = "<|endoftext|>"
TINY_NARRATIVE = (
    "The optic disc shows an enlarged cup with a cup-to-disc ratio of 0.72. "
    "The average retinal nerve fibre layer (RNFL) thickness is 24.1 um, below normal. "
    "The macula and vessels look unremarkable. These findings indicate glaucoma."
)
TINY_LABEL = "Glaucoma"
TINY_REPORT = format_target(TINY_NARRATIVE, TINY_LABEL)


def train_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the prompt, the report and the label names; ChatML tokens and <image> special.

    The project's one BPE trainer (`training.tokenizer.train_bpe`, the phantom pipeline's), word-level
    pieces like Qwen2's.
    """
    from training.tokenizer import train_bpe

    corpus = [
        build_prompt({b.key: float(np.mean(b.normal)) for b in BIOMARKERS}),
        TINY_REPORT,
        *(f"Diagnosis: {label.value}" for label in DIAGNOSTIC_LABELS),
    ]
    return train_bpe(corpus * 4, vocab_size=vocab_size, min_frequency=1, phrases=False)


def write_retfound_pth(encoder: torch.nn.Module, path: Path) -> Path:
    """RETFound's layout: MAE weights under `model` (decoder keys included), args Namespace beside them."""
    state = dict(encoder.state_dict())
    dim = state["pos_embed"].shape[-1]
    state.update(
        {
            "mask_token": torch.zeros(1, 1, dim),
            "decoder_embed.weight": torch.zeros(dim, dim),
            "decoder_norm.weight": torch.ones(dim),
        }
    )
    torch.save({"model": state, "args": argparse.Namespace(model="vit_large_patch16"), "epoch": 799}, path)
    return path


def write_retizero_pth(lora_encoder: torch.nn.Module, path: Path) -> Path:
    """RetiZero's layout: the CLIP model's flat state dict, the LoRA ViT under vision_model.model.lora_vit."""
    state = {f"vision_model.model.lora_vit.{k}": v for k, v in lora_encoder.state_dict().items()}
    dim = lora_encoder.embed_dim
    state.update(
        {
            "vision_model.projection_head_vision.projection.weight": torch.randn(8, dim),
            "text_model.model.embeddings.word_embeddings.weight": torch.randn(10, 8),
            "text_model.projection_head_text.projection.weight": torch.randn(8, 8),
            "logit_scale": torch.tensor(math.log(1 / 0.07)),
        }
    )
    torch.save(state, path)
    return path


def _encoders(config: GrokConfig, work: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Random tiny encoders round-tripped through third-party checkpoint files and our loaders."""
    cfp = apply_qkv_lora(build_encoder(config.cfp_encoder), config.cfp_encoder.lora_rank)
    for module in cfp.modules():
        if isinstance(module, LoraQKV):  # a non-zero LoRA, so that merging matters
            torch.nn.init.normal_(module.linear_b_q.weight, std=0.05)
            torch.nn.init.normal_(module.linear_b_v.weight, std=0.05)
    oct_encoder = build_encoder(config.oct_encoder)
    cfp_merged = load_retizero(write_retizero_pth(cfp, work / "RetiZero.pth"), config.cfp_encoder)
    oct_loaded = load_retfound(write_retfound_pth(oct_encoder, work / "RETFound_oct.pth"), config.oct_encoder)
    return cfp_merged, oct_loaded


def _heads(config: GrokConfig, rng: np.random.Generator) -> list[BiomarkerHead]:
    heads = []
    for modality, keys, dim in (
        ("OCT", OCT_KEYS, config.oct_encoder.embed_dim),
        ("CFP", CFP_KEYS, config.cfp_encoder.embed_dim),
    ):
        mid = np.array([np.mean(BY_KEY[k].normal) for k in keys])
        weight = rng.normal(0, 0.01, (len(keys), dim)) * mid[:, None]
        heads.append(BiomarkerHead.from_ridge(modality, weight, mid))
    return heads


def _fit_llm(model: GrokModel, tokenizer, config: GrokConfig, steps: int, rng: np.random.Generator) -> None:
    """Teach the tiny LLM to answer TINY_REPORT whatever the images and estimates (with and without OCT/CFP)."""
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=max(steps, 1), pct_start=0.1)
    dim = config.projector.vision_dim
    model.train()
    for step in range(steps):
        missing = ((), ("OCT",), ("CFP",))[step % 3]
        values = {b.key: float(rng.uniform(*b.normal)) for b in BIOMARKERS if b.modality.value not in missing}
        ex = build_training_example(
            tokenizer,
            TINY_REPORT,
            biomarkers=values,
            missing=missing,
            max_length=config.max_length,
            visual_tokens=config.visual_tokens,
        )
        cfp = None if "CFP" in missing else [torch.randn(196, dim)]
        oct_tokens = None if "OCT" in missing else [torch.randn(196, dim)]
        out = model(
            torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]), cfp_tokens=cfp, oct_tokens=oct_tokens
        )
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()


def tiny_decision(label: str = TINY_LABEL, probability: float = 0.8) -> DecisionClassifier:
    """A decision classifier that gives `label` the probability `probability` whatever the estimates (zero
    weights), above the 0.5 operating point: the tiny bundle's eyes are stated as `label`, which its LLM's
    findings conclude. No prompt line: the tiny LLM was trained without one."""
    k = len(DIAGNOSTIC_LABELS)
    bias = np.zeros(k)
    bias[[label_.value for label_ in DIAGNOSTIC_LABELS].index(label)] = math.log(
        probability * (k - 1) / (1 - probability)
    )
    n = len(BIOMARKERS)
    model = PatternHead(np.zeros(n), np.ones(n), np.zeros((n, k)), bias)
    return DecisionClassifier(model, prompt_line=False, fitted_on={"training_data": "none: fixed test classifier"})


def build_tiny_bundle(out_dir: Path, *, layout: str = "merged", train_steps: int = 200, seed: int = 0) -> Path:
    """Build the bundle at `out_dir` (layout "merged", or "adapter": base + PEFT LoRA merged at load)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    work = Path(str(out_dir) + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    config = GrokConfig.tiny(vocab_size=64 * math.ceil(len(tokenizer) / 64))
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=config.llm.vocab_size,
            hidden_size=config.llm.hidden_size,
            num_hidden_layers=config.llm.num_hidden_layers,
            num_attention_heads=config.llm.num_attention_heads,
            num_key_value_heads=config.llm.num_key_value_heads,
            intermediate_size=config.llm.intermediate_size,
            max_position_embeddings=config.llm.max_position_embeddings,
            rope_theta=config.llm.rope_theta,
            tie_word_embeddings=False,
            eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    )
    projectors = Projectors(config.projector)
    model = GrokModel(llm, projectors, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    _fit_llm(model, tokenizer, config, train_steps, rng)
    cfp, oct_encoder = _encoders(config, work)
    parts = ModelParts(
        config=config,
        cfp_encoder=cfp,
        oct_encoder=oct_encoder,
        heads=_heads(config, rng),
        projectors=projectors,
        tokenizer_dir=work / "tokenizer",
        decision=tiny_decision(),
    )
    if layout == "merged":
        llm.save_pretrained(work / "llm")
        parts = replace(parts, llm_dir=work / "llm")
    else:
        parts = replace(parts, **_adapter_dirs(llm, work), merge=False)
    path = build_bundle(
        out_dir,
        parts,
        name="grok-tiny",
        version="0.0.1-test",
        provenance={"training_data": "none: random tiny test model", "seed": seed},
        options=BundleOptions(overwrite=True, progress=False),
    )
    shutil.rmtree(work)
    return path


def _adapter_dirs(llm: Qwen2ForCausalLM, work: Path) -> dict[str, Path]:
    """Split the fitted LLM into a base and a (non-trivial) LoRA adapter on q/k/v/o/gate/up/down."""
    from peft import LoraConfig, get_peft_model

    llm.save_pretrained(work / "base")
    lora = get_peft_model(
        llm,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    lora.save_pretrained(work / "adapter")
    return {"base_dir": work / "base", "adapter_dir": work / "adapter"}


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private copy of a bundle (tests that tamper must never touch the shared one)."""
    shutil.copytree(src, dst)
    return dst


def lm_decides(src: Path, dst: Path) -> Path:
    """A private copy of a bundle without its decision classifier: the language model decides its labels
    (the paper's configuration), as the engine's language-model label rule is tested on."""
    import json

    from grok_pacs.analysis.bundle import MANIFEST
    from grok_pacs.model.decision import DECISION_FILE

    copy_bundle(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest.pop("decision", None)
    manifest["files"].pop(DECISION_FILE, None)
    manifest["decides"] = "language model"
    (dst / DECISION_FILE).unlink(missing_ok=True)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dst
