"""Stage-3 checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint holds what resuming needs: the trainable weights (LoRA + projectors), the AdamW state, the RNG
state, where the loop was (epoch, micro-batch, optimiser step, loss history) and the run's full
`Stage3Config` (`config.json`, so a checkpoint explains itself). A model sharded with FSDP
(`Stage3Config.shard`) is gathered onto rank 0 first (`save_sharded`, `load_sharded`: `training.sharding`), so
its files are the ones a single process writes, and either kind of run resumes the other's. A resume under
another configuration is refused, naming the fields that differ. The scheduler is rebuilt and fast-forwarded
to the step. Writes go to a temporary folder that is renamed into place, so a run killed mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training import sharding
from training.stage3.config import RESUME_FREE_FIELDS

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not belong to this run (other config or other parameters)."""


@dataclass
class LoopState:
    """Where training stands; `micro` is the next micro-batch index within `epoch`."""

    epoch: int = 0
    micro: int = 0
    step: int = 0
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    config_digest: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the full Stage3Config.to_dict() of the run


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config fields whose values differ between a checkpoint and this run (resume-free fields aside)."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as the saved JSON has them
    keys = (set(saved) | set(current)) - RESUME_FREE_FIELDS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loop: LoopState) -> Path:
    """Write `run_dir/checkpoints/latest` atomically (the previous one is replaced only when complete)."""
    return write_checkpoint(run_dir, trainable_state(model), optimizer.state_dict(), loop)


def save_sharded(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loop: LoopState) -> Path | None:
    """`save_checkpoint` of an FSDP-sharded model: every rank gathers, rank 0 writes (and gets the path)."""
    weights, optimizer_state = sharding.full_state(model, optimizer)
    return write_checkpoint(run_dir, weights, optimizer_state, loop) if optimizer_state else None


def write_checkpoint(
    run_dir: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any], loop: LoopState
) -> Path:
    """Write full (unsharded) trainable weights and an `optimizer.state_dict()` as `run_dir/checkpoints/latest`."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{loop.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"loop": asdict(loop), "optimizer": opt_meta}, indent=1))
    (tmp / "config.json").write_text(json.dumps(loop.config, indent=1, sort_keys=True))
    final = root / LATEST
    old = root / ".old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    path = Path(run_dir) / CHECKPOINT_DIR / LATEST
    return path if (path / "state.json").is_file() else None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]
) -> LoopState:
    """Restore weights, optimiser and RNG from `path`; refuses a checkpoint of another configuration.

    `config` is this run's `Stage3Config.to_dict()`; the refusal names every field that differs.
    """
    loop, weights, optimizer_state = read_checkpoint(path, model, config)
    _copy_weights(model, weights)
    optimizer.load_state_dict(optimizer_state)
    _restore_rng(path)
    return loop


def load_trainable(path: Path, model: nn.Module, config: dict[str, Any]) -> LoopState:
    """The trained weights alone (LoRA + projectors) of `path` into an unsharded model: how rank 0 rebuilds
    a run trained with FSDP for export, the sharded model being unusable by one rank."""
    loop, weights, _ = read_checkpoint(path, model, config)
    _copy_weights(model, weights)
    return loop


def _copy_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> LoopState:
    """`load_checkpoint` into an FSDP-sharded model: every rank reads the files and keeps its slices."""
    loop, weights, optimizer_state = read_checkpoint(path, model, config)
    sharding.load_full_state(model, optimizer, weights, optimizer_state)
    _restore_rng(path)
    return loop


def read_checkpoint(
    path: Path, model: nn.Module, config: dict[str, Any]
) -> tuple[LoopState, dict[str, torch.Tensor], dict[str, Any]]:
    """(loop state, trainable weights, optimiser state) of `path`, checked against this run's config and model."""
    meta = json.loads((path / "state.json").read_text())
    loop = LoopState(**meta["loop"])
    loop.train_losses = [tuple(x) for x in loop.train_losses]  # type: ignore[misc]
    loop.val_losses = [tuple(x) for x in loop.val_losses]  # type: ignore[misc]
    if not loop.config:
        raise CheckpointMismatch(
            f"checkpoint {path} carries no configuration (written by an older version): "
            "use a new output folder or --no-resume"
        )
    changed = changed_fields(loop.config, config)
    config = json.loads(json.dumps(config))
    if changed:
        detail = ", ".join(f"{k}: {loop.config.get(k)!r} -> {config.get(k)!r}" for k in changed[:6])
        raise CheckpointMismatch(
            f"cannot resume {path}: config fields changed since it was written: {changed} "
            f"({detail}); use a new output folder or --no-resume"
        )
    weights = load_file(str(path / "trainable.safetensors"))
    expected = trainable_names(model)
    if set(weights) != expected:
        diff = sorted(set(weights) ^ expected)[:5]
        raise CheckpointMismatch(f"checkpoint {path} holds other trainable parameters: {diff}")
    optimizer_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    return loop, weights, optimizer_state


def _restore_rng(path: Path) -> None:
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
