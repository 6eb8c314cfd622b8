"""The stage-3 SFT loop: LoRA + projectors train, everything else is frozen.

Loss on assistant tokens only (labels from `grok_pacs.model.prompt`; spliced visual positions carry none), summed
over the tokens of a whole accumulation window and divided by their count (so gradient accumulation gives
the same update as one big batch), AdamW with two learning rates (LoRA / projectors), linear warmup then
cosine decay, gradient clipping, bf16 autocast on a GPU that supports it (or on request on a CPU with AMX), optional
gradient checkpointing. Checkpoints (safetensors + JSON) are written at step boundaries; `fit(resume=True)`
continues from the last one. Progress is a tqdm bar; the loss curve is saved as a PNG.
Under torchrun each rank trains a share of every micro-batch in DistributedDataParallel and rank 0 validates and
writes (`training.distributed`, docs/training.md); with `shard="fsdp"` the model is sharded over the ranks instead
(`training.sharding`), every rank validates its share, and checkpoints are gathered onto rank 0.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from grok_pacs.model.grok import GrokModel
from grok_pacs.model.precision import cpu_has_amx_bf16
from grok_pacs.model.prompt import IGNORE_INDEX
from training import distributed, sharding
from training.stage3.checkpoint import (
    LoopState,
    latest_checkpoint,
    load_checkpoint,
    load_sharded,
    save_checkpoint,
    save_sharded,
)
from training.stage3.config import Stage3Config
from training.stage3.data import SFTDataset, collate, target_token_count

log = logging.getLogger(__name__)

CURVE_PNG = "loss_curve.png"
HISTORY_JSON = "loss_history.json"


def select_precision(cfg: Stage3Config, amx: bool | None = None) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None): "auto" is bf16 on a CUDA GPU with bf16 support and fp32 on the CPU;
    "bf16" is honoured on such a GPU or on a CPU with AMX bf16 tiles (`amx`: None = look at this CPU) and refused
    elsewhere, where it would be emulated."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cfg.precision == "fp32":
        return device, None
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    if cfg.precision == "auto":
        return device, (torch.bfloat16 if cuda_bf16 else None)
    if cuda_bf16 or (not cuda and (cpu_has_amx_bf16() if amx is None else amx)):
        return device, torch.bfloat16
    raise RuntimeError(
        "precision 'bf16' needs a CUDA GPU with bf16 support or a CPU with AMX bf16 tiles; use 'auto' or 'fp32'"
    )


@dataclass
class TrainResult:
    steps: int
    train_losses: list[tuple[int, float]]
    val_losses: list[tuple[int, float]]
    seconds: float
    curve_png: Path

    @property
    def first_val_loss(self) -> float | None:
        return self.val_losses[0][1] if self.val_losses else None

    @property
    def last_val_loss(self) -> float | None:
        return self.val_losses[-1][1] if self.val_losses else None


def token_weights(targets: torch.Tensor, weight: float, decision_tokens: tuple[int, int]) -> torch.Tensor:
    """Per-token loss weights: 0 off the reply, 1 on it, `weight` on its first and last tokens.

    The first tokens of the reply commit to a reading of the images and the last ones are the diagnosis
    line: `decision_tokens` = (how many first, how many last) get `weight` (1 = plain SFT).
    """
    mask = targets != IGNORE_INDEX
    weights = mask.float()
    if weight != 1.0:
        first, last = decision_tokens
        rank = mask.long().cumsum(dim=1)
        total = mask.long().sum(dim=1, keepdim=True)
        decision = mask & ((rank <= first) | (rank > total - last))
        weights = torch.where(decision, torch.full_like(weights, weight), weights)
    return weights


class _LossSum(torch.nn.Module):
    """The trainer's loss of one micro-batch as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: GrokModel, loss_sum: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model  # registered, so DDP sees (and synchronises) its trainable parameters
        self._loss_sum = loss_sum

    def forward(self, batch: dict[str, Any], denominator: float, weight: float) -> torch.Tensor:
        return self._loss_sum(batch, denominator, weight)


class SFTTrainer:
    """Trains `model` (a GrokModel whose LLM carries LoRA) on `train`, measuring loss on `val`."""

    def __init__(
        self,
        model: GrokModel,
        cfg: Stage3Config,
        train: SFTDataset,
        val: SFTDataset | None,
        run_dir: Path,
        pad_id: int,
        progress: bool = True,
    ) -> None:
        if len(train) == 0:
            raise ValueError("stage 3: no training samples")
        self.model, self.cfg, self.train_ds, self.val_ds = model, cfg, train, val
        self.run_dir, self.pad_id, self.progress = Path(run_dir), pad_id, progress
        self.device, self.autocast_dtype = select_precision(cfg)
        self.model.to(self.device)
        self.micro_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.gradient_checkpointing:
            model.llm.config.use_cache = False
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Under torchrun: each rank takes a share of every micro-batch; DDP (or FSDP) averages the gradients.
        self.sharded = distributed.active() and cfg.shard == "fsdp"
        self.ddp = None
        if self.sharded:
            self.ddp = sharding.shard(_LossSum(model, self._loss_sum), model.llm)
        elif distributed.active():
            self.ddp = distributed.wrap(_LossSum(model, self._loss_sum), self.device, find_unused=True)
        self.optimizer = self._optimizer()  # after FSDP, which replaces the parameters with sharded ones

    def _optimizer(self) -> torch.optim.Optimizer:
        lora = [p for n, p in self.model.llm.named_parameters() if p.requires_grad]
        projectors = [p for p in self.model.projectors.parameters() if p.requires_grad]
        if not lora:
            raise RuntimeError("stage 3: the LLM has no trainable (LoRA) parameters")
        if not projectors:
            raise RuntimeError("stage 3: the projectors have no trainable parameters")
        groups = [
            {"params": lora, "lr": self.cfg.lr, "name": "lora"},
            {"params": projectors, "lr": self.cfg.projector_lr, "name": "projectors"},
        ]
        return torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.999))

    def _scheduler(self, step: int) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = math.ceil(self.cfg.warmup_ratio * self.total_steps)
        scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        with warnings.catch_warnings():  # fast-forward after a resume; no optimiser step is missing
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                scheduler.step()
        return scheduler

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return torch.randperm(len(self.train_ds), generator=generator).tolist()

    def _windows(self, epoch: int, start_micro: int) -> Iterator[list[list[int]]]:
        order = self._order(epoch)
        size, accum = self.cfg.batch_size, self.cfg.grad_accum
        micro = [order[i : i + size] for i in range(0, len(order), size)]
        for first in range(start_micro, len(micro), accum):
            yield micro[first : first + accum]

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        moved = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}
        for key in ("cfp_tokens", "oct_tokens"):
            moved[key] = [t.to(self.device) if t is not None else None for t in batch[key]]
        return moved

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _loss_sum(self, batch: dict[str, Any], denominator: float, weight: float = 1.0) -> torch.Tensor:
        """Weighted sum of the batch's assistant-token losses divided by `denominator` (the window's weight)."""
        dev = self._to_device(batch)
        with self._autocast():
            inputs = self.model.splice(
                dev["input_ids"], dev["attention_mask"], dev["labels"], dev["cfp_tokens"], dev["oct_tokens"]
            )
            labels = inputs.pop("labels")
            weights = token_weights(labels[:, 1:], weight, self.cfg.decision_tokens)
            # Logits only where a row has a reply token to predict: the prompt's positions (about 2/3 of a
            # compact SmolLM2 sample) would cost the vocabulary projection and its backward for nothing.
            keep = (weights > 0).any(0).nonzero().flatten()
            logits = self.model.llm(**inputs, logits_to_keep=keep).logits
        losses = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels[:, 1:][:, keep].clamp(min=0), reduction="none"
        )
        return (losses * weights[:, keep]).sum() / denominator

    def _step(self, window: list[list[int]]) -> float:
        if self.ddp is not None:
            return self._step_shared(window)
        batches = [collate((self.train_ds[i] for i in idx), self.pad_id) for idx in window]
        weight = self.cfg.decision_weight
        tokens = sum(float(token_weights(b["labels"][:, 1:], weight, self.cfg.decision_tokens).sum()) for b in batches)
        if tokens == 0:
            raise ValueError(f"records {batches[0]['record_ids'][:3]}... carry no assistant tokens")
        total = 0.0
        for batch in batches:
            loss = self._loss_sum(batch, tokens, weight)
            loss.backward()
            total += float(loss.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _step_shared(self, window: list[list[int]]) -> float:
        """`_step` across ranks: the same update from this rank's share of each micro-batch.

        The window's token weight is summed over all ranks, each rank's loss is its tokens' share of the
        window loss, and it is scaled by the world size because DDP averages (not sums) the gradients.
        A rank whose share of a short micro-batch is empty runs one sample at weight 0, as DDP needs
        every rank in every gradient exchange.
        """
        world, weight = distributed.world_size(), self.cfg.decision_weight
        shares = []  # (indices, 1) or, for an empty share, (one stand-in sample, 0)
        for idx in window:
            mine = list(distributed.share(idx))
            shares.append((mine, 1.0) if mine else (idx[:1], 0.0))
        batches = [collate((self.train_ds[i] for i in idx), self.pad_id) for idx, _ in shares]
        local = sum(
            scale * float(token_weights(b["labels"][:, 1:], weight, self.cfg.decision_tokens).sum())
            for b, (_, scale) in zip(batches, shares, strict=True)
        )
        tokens = distributed.sum_across(local)
        if tokens == 0:
            raise ValueError(f"records {window[0][:3]}... carry no assistant tokens")
        total = 0.0
        for k, (batch, (_, scale)) in enumerate(zip(batches, shares, strict=True)):
            with sharding.accumulate(self.ddp, last=k == len(batches) - 1):  # DDP: one exchange per window
                loss = self.ddp(batch, tokens, weight) * scale
                (loss * world).backward()
            total += float(loss.detach())
        if self.sharded:  # a projector no eye of the window used: no gradient, as in one process
            sharding.drop_idle_grads([p for p in self.model.projectors.parameters() if p.requires_grad])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return distributed.sum_across(total)

    @torch.no_grad()
    def evaluate(self, dataset: SFTDataset | None = None) -> float:
        """Mean loss per assistant token over a dataset (the validation set by default)."""
        dataset = dataset if dataset is not None else self.val_ds
        if dataset is None or len(dataset) == 0:
            return float("nan")
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        for start in range(0, len(dataset), self.cfg.batch_size):
            idx = list(range(start, min(start + self.cfg.batch_size, len(dataset))))
            scale = 1.0
            if self.sharded:  # every rank takes part in every forward: its share, or one sample at weight 0
                mine = list(distributed.share(idx))
                idx, scale = (mine, 1.0) if mine else (idx[:1], 0.0)
            batch = collate((dataset[i] for i in idx), self.pad_id)
            loss = self.ddp(batch, 1, 1.0) if self.sharded else self._loss_sum(batch, 1)
            total += float(loss) * scale
            tokens += int(target_token_count(batch) * scale)
        self.model.train(was_training)
        if self.sharded:
            total, tokens = distributed.sum_across(total), int(distributed.sum_across(tokens))
        return total / max(tokens, 1)

    def _validates(self) -> bool:
        """Rank 0 validates alone, except with FSDP, where every rank holds a slice of the model."""
        return self.val_ds is not None and (distributed.is_main() or self.sharded)

    def fit(self, resume: bool = True, max_steps: int | None = None) -> TrainResult:
        """Train for `cfg.epochs` (continuing from the latest checkpoint when `resume`).

        `max_steps` stops early after that many optimiser steps in all (a checkpoint is written there), as
        an interruption would; a later `fit()` continues from it.
        """
        torch.manual_seed(self.cfg.seed)
        loop = LoopState(config_digest=self.cfg.digest(), config=self.cfg.to_dict())
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            load = load_sharded if self.sharded else load_checkpoint
            loop = load(checkpoint, self.model, self.optimizer, self.cfg.to_dict())
            log.info("stage 3: resumed from %s at step %d", checkpoint, loop.step)
        scheduler = self._scheduler(loop.step)
        main = distributed.is_main()  # rank 0 writes checkpoints and the curve
        if not loop.val_losses and self._validates():
            loop.val_losses.append((0, self.evaluate()))
        started = time.monotonic()
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=loop.step,
            desc="stage 3: LoRA SFT",
            unit="step",
            disable=not self.progress or not main,
        )
        while loop.epoch < self.cfg.epochs:
            for window in self._windows(loop.epoch, loop.micro):
                loss = self._step(window)
                scheduler.step()
                loop.step += 1
                loop.micro += len(window)
                loop.train_losses.append((loop.step, loss))
                bar.update(1)
                bar.set_postfix(epoch=loop.epoch + 1, loss=f"{loss:.3f}")
                self._periodic(loop, every_eval=self.cfg.eval_every, every_ckpt=self.cfg.checkpoint_every)
                if max_steps is not None and loop.step >= max_steps:
                    self._save(loop)
                    bar.close()
                    return TrainResult(
                        loop.step, loop.train_losses, loop.val_losses, time.monotonic() - started, self.plot(loop)
                    )
            loop.epoch += 1
            loop.micro = 0
            self._periodic(loop, every_eval=0, every_ckpt=0, epoch_end=True)
        if self.sharded and not (self.cfg.checkpoint_every == 0 or loop.step % self.cfg.checkpoint_every == 0):
            self._save(loop)  # the sharded model cannot be exported by rank 0: its last checkpoint can
        bar.close()
        self.model.eval()
        curve = self.plot(loop)
        return TrainResult(loop.step, loop.train_losses, loop.val_losses, time.monotonic() - started, curve)

    def _periodic(self, loop: LoopState, every_eval: int, every_ckpt: int, epoch_end: bool = False) -> None:
        """Validation loss and checkpoint at their step interval, or at the epoch end when the interval is 0."""
        due_eval = (every_eval and loop.step % every_eval == 0) or (epoch_end and not self.cfg.eval_every)
        if due_eval and self._validates():
            loop.val_losses.append((loop.step, self.evaluate()))
            log.info("stage 3: step %d validation loss %.4f", loop.step, loop.val_losses[-1][1])
        due_ckpt = (every_ckpt and loop.step % every_ckpt == 0) or (epoch_end and not self.cfg.checkpoint_every)
        if due_ckpt:
            self._save(loop)

    def _save(self, loop: LoopState) -> None:
        """Rank 0 writes the checkpoint (gathered from every rank with FSDP); every rank waits for it (a resume on
        any rank reads it)."""
        if self.sharded:
            save_sharded(self.run_dir, self.model, self.optimizer, loop)
        elif distributed.is_main():
            save_checkpoint(self.run_dir, self.model, self.optimizer, loop)
        distributed.barrier()

    def plot(self, loop: LoopState) -> Path:
        """loss_curve.png (training loss per step, validation loss per evaluation) and loss_history.json."""
        path = self.run_dir / CURVE_PNG
        if not distributed.is_main():
            return path  # rank 0 draws it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / HISTORY_JSON).write_text(
            json.dumps({"train": loop.train_losses, "val": loop.val_losses}, indent=1)
        )
        fig, ax = plt.subplots(figsize=(7, 4))
        if loop.train_losses:
            steps, losses = zip(*loop.train_losses)
            ax.plot(steps, losses, lw=0.8, alpha=0.8, label="training loss (per step)")
        if loop.val_losses:
            steps, losses = zip(*loop.val_losses)
            ax.plot(steps, losses, "o-", label="validation loss")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("loss per assistant token")
        ax.set_title(f"stage 3 LoRA SFT ({self.cfg.name})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
