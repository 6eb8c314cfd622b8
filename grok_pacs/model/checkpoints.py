"""Loading encoder weights: RETFound `.pth`, RetiZero `.pth`, and our own safetensors.

Third-party checkpoints are read with `torch.load(weights_only=True)` (no arbitrary pickle); our own files
are safetensors. Every load checks the key set: keys the source model has and ours deliberately lacks
(MAE decoder, classifier head, RetiZero's text tower) are expected; any other missing or unexpected key, or
a shape mismatch, raises `CheckpointError` naming the keys, so a wrong file never loads half-way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from grok_pacs.model.config import EncoderConfig
from grok_pacs.model.vit import RetinaEncoder, apply_qkv_lora, build_encoder, has_lora, merge_qkv_lora

#: Keys of a RETFound (MAE) checkpoint that our encoder does not have: the MAE decoder and a classifier.
RETFOUND_IGNORED_PREFIXES = ("decoder_", "mask_token", "head.", "fc_norm.")
#: RETFound's own key remaps (main_finetune.py): DINOv2-style names to timm names.
RETFOUND_KEY_REMAPS = (("backbone.", ""), ("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))
#: Where RetiZero's CLIP model keeps its LoRA ViT.
RETIZERO_VIT_PREFIX = "vision_model.model.lora_vit."
#: RetiZero keys outside the image encoder: text tower, CLIP projections, temperature.
RETIZERO_IGNORED_PREFIXES = ("text_model.", "vision_model.projection_head_vision.", "logit_scale", "head.", "fc_norm.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the encoder; the message names the file and the keys."""


def _torch_load(path: Path) -> dict:
    """torch.load with weights_only=True; RETFound saves its argparse Namespace next to the weights."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in several types; all mean "not a weights file"
        raise CheckpointError(f"{path} is not a weights-only torch checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _short(keys: list[str], limit: int = 8) -> str:
    head = ", ".join(sorted(keys)[:limit])
    return head + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_checked(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str, ignored_prefixes: tuple[str, ...] = ()
) -> list[str]:
    """Load `state` (strict=False) after checking keys and shapes; returns the ignored keys.

    Missing keys are always an error (every encoder parameter must come from the file); unexpected keys are
    allowed only under `ignored_prefixes`.
    """
    own = model.state_dict()
    ignored = [k for k in state if k not in own and k.startswith(ignored_prefixes)]
    unexpected = [k for k in state if k not in own and k not in ignored]
    missing = [k for k in own if k not in state]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    bad_shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        problems.append(f"shape mismatch (file vs model): {_short(bad_shapes, 4)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the encoder: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return ignored


def _fit_pos_embed(state: dict[str, torch.Tensor], encoder: RetinaEncoder) -> None:
    """Resample a pos_embed trained at another resolution (RETFound's interpolate_pos_embed)."""
    pos = state.get("pos_embed")
    target = encoder.pos_embed
    if pos is None or pos.shape == target.shape or pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return
    grid = encoder.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=encoder.num_prefix_tokens)


def retfound_state(raw: dict) -> dict[str, torch.Tensor]:
    """The encoder state of a RETFound file: under `model`, keys remapped as RETFound does."""
    state = raw.get("model", raw)
    if not isinstance(state, dict) or not state:
        raise CheckpointError("RETFound checkpoint has no weights under 'model'")
    out = {}
    for key, value in state.items():
        for old, new in RETFOUND_KEY_REMAPS:
            key = key.replace(old, new)
        out[key] = value
    return out


RETFOUND_ENCODER = EncoderConfig()  # frozen: safe as a default
RETIZERO_ENCODER = EncoderConfig(lora_rank=8)  # RetiZero's CFP ViT carries LoRA rank 8 on qkv


def load_retfound(path: str | Path, cfg: EncoderConfig = RETFOUND_ENCODER) -> RetinaEncoder:
    """A RETFound OCT encoder from its `.pth` (weights under `model`, MAE decoder keys ignored)."""
    path = Path(path)
    encoder = build_encoder(cfg)
    state = retfound_state(_torch_load(path))
    _fit_pos_embed(state, encoder)
    load_checked(encoder, state, source=f"RETFound checkpoint {path}", ignored_prefixes=RETFOUND_IGNORED_PREFIXES)
    return encoder.eval()


def load_retizero(path: str | Path, cfg: EncoderConfig = RETIZERO_ENCODER, *, merge: bool = True) -> RetinaEncoder:
    """RetiZero's CFP encoder: its LoRA ViT out of the CLIP state dict, LoRA merged into qkv unless merge=False."""
    path = Path(path)
    raw = _torch_load(path)
    raw = raw.get("state_dict", raw.get("model", raw))
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    vit_keys = [k for k in raw if k.startswith(RETIZERO_VIT_PREFIX)]
    if not vit_keys:
        raise CheckpointError(f"RetiZero checkpoint {path} has no keys under {RETIZERO_VIT_PREFIX!r}")
    rank_key = f"{RETIZERO_VIT_PREFIX}blocks.0.attn.qkv.linear_a_q.weight"
    rank = int(raw[rank_key].shape[0]) if rank_key in raw else 0
    if rank != cfg.lora_rank:
        raise CheckpointError(f"RetiZero checkpoint {path} has LoRA rank {rank}, config expects {cfg.lora_rank}")
    encoder = build_encoder(cfg)
    if rank:
        apply_qkv_lora(encoder, rank)
    state = {k.removeprefix(RETIZERO_VIT_PREFIX) if k.startswith(RETIZERO_VIT_PREFIX) else k: v for k, v in raw.items()}
    _fit_pos_embed(state, encoder)
    load_checked(encoder, state, source=f"RetiZero checkpoint {path}", ignored_prefixes=RETIZERO_IGNORED_PREFIXES)
    if merge:
        merge_qkv_lora(encoder)
    return encoder.eval()


def save_encoder(encoder: RetinaEncoder, path: str | Path) -> Path:
    """Our format: safetensors of the (LoRA-merged) encoder, with its EncoderConfig in the metadata."""
    if has_lora(encoder):
        raise ValueError("merge the qkv LoRA (merge_qkv_lora) before saving the encoder")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    cfg = {k: v for k, v in encoder.cfg.__dict__.items()}
    save_file(state, str(path), metadata={"format": "grok-pacs-encoder/1", "config": json.dumps(cfg)})
    return path


def load_encoder(path: str | Path, cfg: EncoderConfig | None = None) -> RetinaEncoder:
    """An encoder saved by `save_encoder` (config from the file unless given), or a RETFound / RetiZero .pth."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder weights {path} do not exist")
    if path.suffix in (".pth", ".pt"):
        raw = _torch_load(path)
        is_retizero = any(k.removeprefix("module.").startswith(RETIZERO_VIT_PREFIX) for k in raw)
        if is_retizero:
            return load_retizero(path, cfg or EncoderConfig(lora_rank=8))
        return load_retfound(path, cfg or EncoderConfig())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if cfg is None:
        if "config" not in meta:
            raise CheckpointError(f"{path} has no encoder config in its metadata; pass cfg")
        cfg = EncoderConfig(**json.loads(meta["config"]))
    encoder = build_encoder(cfg)  # saved encoders are merged: a plain ViT whatever cfg.lora_rank says
    load_checked(encoder, load_file(str(path)), source=f"encoder file {path}")
    return encoder.eval()
