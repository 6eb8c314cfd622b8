"""LoRA on the Qwen2 language model: attach (trainable, unlike the paper's code), save, merge.

The paper's code attaches LoRA and then freezes it (upstream LLaVA's ordering), so only its projectors
train (docs/domain.md, The GROK model). Here `attach_lora` freezes the base first, attaches the adapters, and then
CHECKS that every
LoRA matrix requires a gradient and that nothing else of the LLM does; training refuses to start otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from training.stage3.config import Stage3Config


class LoraSetupError(RuntimeError):
    """The adapters would not train (or something besides them would): the paper's bug, caught early."""


def load_base_llm(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM from a local directory only (never a hub), in `dtype`, with frozen weights."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a local transformers model directory")
    llm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    llm.requires_grad_(False)
    return llm


def attach_lora(llm: PreTrainedModel, cfg: Stage3Config) -> PeftModel:
    """Freeze the base, wrap it with LoRA on `cfg.lora_targets`, and check that exactly the adapters train."""
    llm.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(llm, lora)
    check_lora_trainable(model, cfg.lora_targets)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def check_lora_trainable(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Raise LoraSetupError unless every LoRA matrix trains, each target has one, and no base weight trains."""
    lora = lora_parameters(model)
    frozen = [name for name, p in lora.items() if not p.requires_grad]
    if not lora or frozen:
        raise LoraSetupError(
            f"LoRA parameters do not require grad ({len(frozen)} of {len(lora)} frozen): the adapters would not train"
        )
    missing = [t for t in targets if not any(f".{t}." in name for name in lora)]
    if missing:
        raise LoraSetupError(f"no LoRA adapter was attached to {missing}")
    base = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if base:
        raise LoraSetupError(f"base LLM weights would train: {base[:5]}")


def save_adapter(model: PeftModel, out_dir: Path) -> Path:
    """The adapter alone (adapter_config.json + adapter_model.safetensors), loadable with peft."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain LLM with the LoRA folded into its weights (served faster: docs/domain.md, Library facts); `model` is
    untouched."""
    clone = copy.deepcopy(model)
    merged = clone.merge_and_unload(progressbar=False)
    merged.requires_grad_(False)
    return merged.eval()


def save_merged(model: PeftModel, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """Merge the LoRA into a copy of the base and save it as an ordinary transformers directory."""
    merged = merged_copy(model)
    if dtype is not None:
        merged = merged.to(dtype)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
