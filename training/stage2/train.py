"""Stage-2 training loop and the one-call entry point `run(cfg) -> Stage2Result`.

AdamW (encoder and head learning rates apart), linear warm-up then cosine decay per step, deterministic
seeds (the model is initialised from `cfg.seed`; each epoch's shuffling and augmentation come from a
generator seeded with (seed, epoch), so a resumed run repeats exactly what an uninterrupted one does),
bf16 autocast on CUDA. After every epoch: validation (contrastive loss, and a ridge probe fitted on train
and scored on val), `last.*` checkpoint, `best.*` when the selected validation metric improved, one line of
`metrics.jsonl`; `curve.png` at the end. `run` then evaluates and writes the heads. Under torchrun each rank
encodes a share of every batch (DDP; `GatheredAlignment`) and rank 0 validates and writes (docs/training.md).

Run folder (`cfg.out_dir`): stage2-config.json, cache/, last.safetensors+json, best.safetensors+json,
encoder-init.safetensors (the plain encoder), encoder.safetensors (the aligned one, best epoch),
metrics.jsonl, curve.png, eval.json, eval.md, <modality>-head.safetensors.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from grok_pacs.model.checkpoints import load_encoder, save_encoder
from grok_pacs.model.config import EncoderConfig
from grok_pacs.model.vit import RetinaEncoder
from training import distributed
from training.stage2.checkpoint import load_checkpoint, read_meta, save_checkpoint
from training.stage2.config import CONFIG_NAME, RESUME_FREE_FIELDS, Stage2Config
from training.stage2.data import BiomarkerStats, Stage2Data, augment, augment_acquisition, load_data
from training.stage2.evaluate import ProbeSettings, evaluate_encoders, head_features, save_head, write_report
from training.stage2.metrics_log import MetricsLog
from training.stage2.model import AlignmentModel, GatheredAlignment, build_alignment_model
from training.stage2.probe import fit_ridge, probe_errors

log = logging.getLogger(__name__)

LAST, BEST = "last.safetensors", "best.safetensors"
INIT_ENCODER, ENCODER = "encoder-init.safetensors", "encoder.safetensors"


@dataclass(frozen=True)
class Stage2Result:
    """What a stage-2 run leaves behind (all paths inside `out_dir`)."""

    out_dir: Path
    modality: str
    checkpoint_path: Path  #: best.safetensors: the whole alignment model (best.json beside it)
    encoder_path: Path  #: encoder.safetensors: the aligned encoder, grok_pacs.model.checkpoints format
    encoder_config: EncoderConfig
    heads_path: Path  #: <modality>-head.safetensors, grok_pacs.model.heads.BiomarkerHead format
    report_path: Path  #: eval.json (eval.md beside it)
    report: dict

    @property
    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The aligned encoder's state dict (RetinaEncoder keys)."""
        return load_file(str(self.encoder_path))

    def load_encoder(self) -> RetinaEncoder:
        """The aligned encoder as a module (eval mode), ready for export or stage 3."""
        return load_encoder(self.encoder_path)


@dataclass(frozen=True)
class TrainOutcome:
    best_path: Path
    best_epoch: int
    epochs_done: int
    stats: BiomarkerStats


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"stage-2 config asks for device {name!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def _alignment_model(cfg: Stage2Config) -> AlignmentModel:
    """The alignment model cfg describes, with its initial weights (from the current torch seed)."""
    return build_alignment_model(
        cfg.encoder_config(),
        len(cfg.biomarker_keys),
        cfg.proj_dim,
        cfg.bio_hidden,
        cfg.loss,
        cfg.temperature,
        cfg.learn_temperature,
    )


def make_model(cfg: Stage2Config) -> AlignmentModel:
    """A fresh alignment model from cfg.seed; the encoder starts from cfg.init_checkpoint when given."""
    seed_everything(cfg.seed)
    model = _alignment_model(cfg)
    if cfg.init_checkpoint:
        start = load_encoder(cfg.init_checkpoint, cfg.encoder_config())
        model.encoder.load_state_dict(start.state_dict())
    return model


def make_optimizer(cfg: Stage2Config, model: AlignmentModel) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices; the encoder has its own learning rate."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.startswith("encoder."), param.ndim >= 2), []).append(param)
    param_groups = []
    for (is_encoder, decay), params in sorted(groups.items()):
        lr = cfg.encoder_lr if is_encoder else cfg.lr
        param_groups.append(
            {"params": params, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        )
    return torch.optim.AdamW(param_groups)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_epoch(
    cfg: Stage2Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Stage2Data,
    stats: BiomarkerStats,
    epoch: int,
    step: int,
    device: torch.device,
) -> tuple[float, int]:
    """One pass over the train split in drop-last batches; returns (mean loss, global step after).

    Distributed, `model` is the DDP-wrapped `GatheredAlignment`: every rank draws the same global batch and
    augmentation (one generator), encodes its shard of the images, and gets the loss of the whole batch.
    """
    model.train()
    rows = data.rows("train")
    batch = min(cfg.batch_size, len(rows))
    steps_per_epoch = len(rows) // batch
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = rows[torch.randperm(len(rows), generator=generator)]
    losses = []
    use_bf16 = cfg.bf16 and device.type == "cuda"
    bar = tqdm(
        range(steps_per_epoch),
        desc=f"stage2 {cfg.modality} epoch {epoch}/{cfg.epochs}",
        disable=not cfg.progress or not distributed.is_main(),
        leave=False,
        unit="batch",
    )
    for b in bar:
        idx = order[b * batch : (b + 1) * batch]
        images = data.images[idx].to(device).float()  # float16 cache: half the bytes to move
        if cfg.augment:
            images = augment(images, generator)
        if cfg.augment_acquisition:
            images = augment_acquisition(images, generator, cfg.modality)
        values = stats.standardise(data.values[idx]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, total, warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(distributed.shard(images) if distributed.active() else images, values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses)), step


@torch.no_grad()
def validate(
    cfg: Stage2Config, model: AlignmentModel, data: Stage2Data, stats: BiomarkerStats, device: torch.device
) -> dict[str, float | None]:
    """Contrastive loss on val batches, and the val error of a ridge probe fitted on train features."""
    rows = data.rows("val")
    if len(rows) == 0:
        return {"val_loss": None, "val_probe_mae": None, "val_probe_mae_std": None}
    model.eval()
    use_bf16 = cfg.bf16 and device.type == "cuda"
    losses, batch = [], min(cfg.batch_size, len(rows))
    for start in range(0, len(rows) - batch + 1, batch):
        idx = rows[start : start + batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(data.images[idx].float().to(device), stats.standardise(data.values[idx]).to(device))
        losses.append(float(loss))
    train_rows = data.rows("train")
    feats = {
        split: head_features(model.encoder, data.images[r], device, cfg.eval_batch_size, cfg.bf16, cfg.head_grid)
        for split, r in (("train", train_rows), ("val", rows))
    }  # never the test eyes
    probe = fit_ridge(
        feats["train"],
        data.values[train_rows].double().numpy(),
        data.keys,
        np.array(data.subjects)[train_rows.numpy()],
        cfg.ridge_alphas,
        cfg.seed,
    )
    errors = probe_errors(probe, feats["val"], data.values[rows].double().numpy())["overall"]
    return {
        "val_loss": float(np.mean(losses)) if losses else None,
        "val_probe_mae": errors["mae"],
        "val_probe_mae_std": errors["mae_std"],
    }


def _selection_value(cfg: Stage2Config, record: dict) -> float | None:
    key = "val_probe_mae_std" if cfg.select_metric == "val_probe_mae" else "val_loss"
    return record.get(key)


def _check_resumable(cfg: Stage2Config, meta: dict) -> None:
    saved = meta.get("config", {})
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUME_FREE_FIELDS and saved.get(k) != v)
    if changed:
        raise ValueError(
            f"cannot resume {Path(cfg.out_dir) / LAST}: config fields changed since it was written: "
            f"{changed}; use another out_dir or resume=False"
        )


def _meta(cfg: Stage2Config, stats: BiomarkerStats, epoch: int, step: int, best: dict) -> dict:
    return {
        "format": "grok-pacs-stage2/1",
        "config": cfg.to_dict(),
        "biomarker_stats": stats.to_dict(),
        "epoch": epoch,
        "step": step,
        "best": best,
    }


def _start(cfg: Stage2Config, data: Stage2Data, device: torch.device):
    """Model, optimizer, statistics and (epoch, step, best): fresh, or from `last.*` when resuming."""
    out = Path(cfg.out_dir)
    if len(data.rows("train")) < 2:
        raise ValueError(
            f"stage 2 needs at least 2 training eyes (a contrastive batch needs negatives), "
            f"the cohort has {len(data.rows('train'))}"
        )
    stats = BiomarkerStats.fit(data.keys, data.values[data.rows("train")])
    model = make_model(cfg)
    if distributed.is_main():
        save_encoder(model.encoder, out / INIT_ENCODER)  # the plain encoder: same seed, same weights on resume
    model.to(device)
    optimizer = make_optimizer(cfg, model)
    epoch, step, best = 0, 0, {"epoch": 0, "value": None}
    if cfg.resume and (out / LAST).is_file():
        _check_resumable(cfg, read_meta(out / LAST))
        meta = load_checkpoint(out / LAST, model, optimizer)
        epoch, step, best = meta["epoch"], meta["step"], meta["best"]
        log.info("stage 2: resuming %s at epoch %d, step %d", out, epoch, step)
    return model, optimizer, stats, epoch, step, best


def _improves(best: float | None, value: float | None) -> bool:
    """Lower is better; without a validation split every epoch counts as the best so far (last wins)."""
    return value is None and best is None or value is not None and (best is None or value < best)


def _end_epoch(
    cfg: Stage2Config,
    model: AlignmentModel,
    optimizer: torch.optim.Optimizer,
    data: Stage2Data,
    stats: BiomarkerStats,
    record: dict,
    best: dict,
    metrics: MetricsLog,
) -> dict:
    """Validate, write `best.*` when it improved and `last.*`, log the epoch; returns the best so far.

    `record` holds epoch, step, train_loss and "started" (the epoch's monotonic start time).
    """
    epoch, step, started = record["epoch"], record["step"], record.pop("started")
    device = next(model.parameters()).device
    record.update(
        {
            **validate(cfg, model, data, stats, device),
            "lr": optimizer.param_groups[0]["lr"],
            "temperature": float(model.loss_fn.temperature),
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    value = _selection_value(cfg, record)
    if _improves(best["value"], value):
        best = {"epoch": epoch, "value": value}
        save_checkpoint(Path(cfg.out_dir) / BEST, model, _meta(cfg, stats, epoch, step, best))
    metrics.append(record)
    save_checkpoint(Path(cfg.out_dir) / LAST, model, _meta(cfg, stats, epoch, step, best), optimizer)
    log.info("stage 2 epoch %d: %s", epoch, record)
    return best


def train(cfg: Stage2Config, data: Stage2Data, *, stop_after: int | None = None) -> TrainOutcome:
    """Train (or resume) in cfg.out_dir. `stop_after` ends after that many epochs in total (to test resume)."""
    cfg.check()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        cfg.save(out / CONFIG_NAME)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or threads)
    try:
        device = pick_device(cfg.device)
        model, optimizer, stats, epoch, step, best = _start(cfg, data, device)
        trainee = distributed.wrap(GatheredAlignment(model), device) if distributed.active() else model
        main = distributed.is_main()
        metrics = MetricsLog(out, keep_epochs=epoch) if main else None
        last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
        while epoch < last_epoch:
            started = time.monotonic()
            train_loss, step = train_epoch(cfg, trainee, optimizer, data, stats, epoch + 1, step, device)
            epoch += 1
            if main:  # validation, checkpoints and the log are rank 0's; the others wait for its files
                record = {"epoch": epoch, "step": step, "train_loss": train_loss, "started": started}
                best = _end_epoch(cfg, model, optimizer, data, stats, record, best, metrics)
            distributed.barrier()
        if main:
            metrics.plot()
    finally:
        torch.set_num_threads(threads)
    return TrainOutcome(out / BEST, int(best["epoch"]), epoch, stats)


def load_best_encoder(cfg: Stage2Config, out_dir: Path | str) -> RetinaEncoder:
    """The encoder of a run's best checkpoint (what stage 3 and export take)."""
    model = _alignment_model(cfg)
    load_checkpoint(Path(out_dir) / BEST, model)
    return model.encoder.eval()


def load_trained_encoder(out_dir: Path | str) -> RetinaEncoder:
    """The aligned encoder a finished run exported (`<out_dir>/encoder.safetensors`)."""
    return load_encoder(Path(out_dir) / ENCODER)


def run(cfg: Stage2Config) -> Stage2Result | None:
    """Manifest + config -> trained encoder, checkpoint, evaluation report and biomarker head.

    Under torchrun every rank trains; only rank 0 evaluates and writes the results (the others get None).
    """
    cfg.check()
    out = Path(cfg.out_dir)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 fills the image cache first; the others then read it
    data = load_data(cfg.manifest, cfg.modality, cfg.biomarker_keys, cfg.image_cache_dir, cfg.progress)
    if distributed.is_main():
        distributed.barrier()
    outcome = train(cfg, data)
    if not distributed.is_main():
        return None
    aligned = load_best_encoder(cfg, out)
    plain = load_encoder(out / INIT_ENCODER)
    save_encoder(aligned, out / ENCODER)
    device = pick_device(cfg.device)
    report, probes = evaluate_encoders(
        data,
        {"aligned": aligned.to(device), "plain": plain.to(device)},
        device,
        ProbeSettings(cfg.ridge_alphas, cfg.seed, cfg.eval_batch_size, cfg.bf16, cfg.modality, cfg.head_grid),
    )
    report["best_epoch"], report["epochs"] = outcome.best_epoch, outcome.epochs_done
    report_path, _ = write_report(report, out)
    heads_path = save_head(probes["aligned"], cfg.modality, out, cfg.head_grid)
    return Stage2Result(
        out, cfg.modality, outcome.best_path, out / ENCODER, aligned.cfg, heads_path, report_path, report
    )
