"""Stage-2 checkpoints: safetensors weights with a JSON file of the same name beside them.

`last.*` holds everything resume needs (model, AdamW state, epoch, step, best so far); `best.*` holds the
model of the best validation epoch. The JSON always carries the full `Stage2Config` and the biomarker
statistics, so a checkpoint explains itself. No pickle: the optimizer state is flattened into tensors
(`optim.<param index>.<name>`), its hyper-parameters go to the JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(
    path: Path, model: torch.nn.Module, meta: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """Write `<path>` (.safetensors) and `<path>` with .json; the JSON is written last (it marks completeness)."""
    tensors = {MODEL_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, entries in state["state"].items():
            for name, value in entries.items():
                tensors[f"{OPTIM_PREFIX}{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
        meta["optimizer_param_groups"] = state["param_groups"]
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    _atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path.with_suffix(".json")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read checkpoint metadata {meta_path}: {exc}") from exc


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load weights (and optimizer state) from a checkpoint; returns its JSON metadata."""
    if not path.is_file():
        raise FileNotFoundError(f"stage-2 checkpoint {path} does not exist")
    meta = read_meta(path)
    tensors = load_file(str(path))
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the stage-2 model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if optimizer is not None:
        if "optimizer_param_groups" not in meta:
            raise ValueError(f"checkpoint {path} has no optimizer state to resume from")
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(OPTIM_PREFIX):
                idx, name = key[len(OPTIM_PREFIX) :].split(".", 1)
                opt_state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    return meta
