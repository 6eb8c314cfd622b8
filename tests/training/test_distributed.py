"""Data-parallel training: one process and two (torchrun, gloo on the CPU) give the same losses and weights.

The global batch is held constant (stage 2: each of the two ranks encodes half of it, and the contrastive loss
and the projector's batch norm see the gathered whole; stage 3: each rank takes a share of every micro-batch,
normalised by the window's token count over both), so the runs differ only in floating-point reduction order.
Stage 3 runs twice on two processes: under DDP and with the model sharded over them (FSDP, its checkpoints
gathered onto rank 0). Each two-process run is interrupted and resumed from the checkpoint its rank 0 wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grok_pacs.model.config import GrokConfig
from grok_pacs.model.vit import build_encoder
from tests.training.test_stage2 import synthetic_data, tiny_config
from tests.training.test_stage3 import CFG, STAND_IN, _model, _records
from training import distributed
from training.stage2.config import Stage2Config
from training.stage2.data import Stage2Data
from training.stage2.train import LAST, train
from training.stage3.__main__ import config_from_args, parse_args
from training.stage3.checkpoint import CHECKPOINT_DIR, LATEST, load_trainable
from training.stage3.config import Stage3Config
from training.stage3.data import SFTDataset, build_samples, chat_text
from training.stage3.features import FeatureStore, encode_images
from training.stage3.pretrain_llm import pretrain_stand_in
from training.stage3.train import SFTTrainer, TrainResult
from training.tokenizer import load_tokenizer, save_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]
TRAIN_RTOL = 1e-5  #: training losses: measured within 1e-7 (relative) of one process, DDP and FSDP alike
VAL_RTOL = 2e-3  #: validation losses: measured within 4e-4, see _NO_GRADIENT
# Biases that feed a batch norm get no gradient (the norm removes any shift): what they receive is rounding
# noise, which AdamW scales to full-size steps, so they drift apart between runs of different reduction order,
# and so do the running means of the norms after them (which the validation loss, in eval mode, uses).
_NO_GRADIENT = ("encoder.norm.bias", "projector.0.bias", "projector.3.bias", "biomarker_encoder.net.2.bias")


def stage2_config(out: Path) -> Stage2Config:
    """Two epochs of two steps (24 training eyes, global batch 12: 6 per rank), with augmentation."""
    return replace(tiny_config(out, epochs=2, augment=True), num_threads=1)


def stage2_data() -> Stage2Data:
    return synthetic_data(n_subjects=20)


#: 7 training samples in micro-batches of 3, 3, 1 and windows of two: uneven shares, an empty one, no_sync
STAGE3_CFG = replace(CFG, batch_size=3, grad_accum=2)


def stage3_assets(root: Path) -> dict:
    """test_stage3's tiny fixture, built once into `root` (features saved) and read back by every process."""
    records, store_path = _records(12), root / "features.safetensors"
    if not store_path.exists():  # the test builds it before it starts the workers
        texts = [r["conversations"][1]["value"] for r in records] + [records[0]["conversations"][0]["value"]]
        save_tokenizer(train_bpe(texts * 3, vocab_size=300, min_frequency=1), root / "tokenizer")
        pretrain_stand_in(
            [chat_text(r) for r in records], load_tokenizer(root / "tokenizer"), STAND_IN, root / "llm", progress=False
        )
        grok, cpu = GrokConfig.tiny(), torch.device("cpu")
        images = torch.randn(len(records), 3, 224, 224, generator=torch.Generator().manual_seed(0))
        cfp, cfp_pooled = encode_images(build_encoder(grok.cfp_encoder), images, 6, cpu, "cfp", False)
        oct_, oct_pooled = encode_images(build_encoder(grok.oct_encoder), images.flip(-1), 6, cpu, "oct", False)
        FeatureStore([r["id"] for r in records], cfp, oct_, cfp_pooled, oct_pooled).save(store_path)
    tokenizer = load_tokenizer(root / "tokenizer")
    store = FeatureStore.load(store_path)
    return {"root": root, "records": records, "tokenizer": tokenizer, "store": store, "grok": GrokConfig.tiny()}


def stage3_trainer(assets: dict, run_dir: Path, seed: int = 0, shard: str = "ddp") -> SFTTrainer:
    samples = build_samples(assets["records"], assets["tokenizer"], assets["store"], max_length=STAGE3_CFG.max_length)
    store, cfg = assets["store"], replace(STAGE3_CFG, shard=shard)
    return SFTTrainer(
        _model(assets, cfg, seed),
        cfg,
        SFTDataset(samples[:7], store),
        SFTDataset(samples[8:], store),
        run_dir,
        assets["tokenizer"].pad_token_id,
        progress=False,
    )


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch (two processes) trains both stages: <root>/stage2, <root>/stage3 (DDP) and
    <root>/stage3-fsdp (the model sharded over the two)."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "assets").mkdir()
    stage3_assets(root / "assets")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = ["-m", "tests.training.distributed_worker"]  # run from the checkout, as pytest imports the tests
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *worker]
    done = subprocess.run([*cmd, str(root)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_shard_splits_a_batch_into_contiguous_equal_parts_or_refuses() -> None:
    batch = list(range(12))
    assert [list(distributed.shard(batch, r, 2)) for r in (0, 1)] == [batch[:6], batch[6:]]
    assert list(distributed.shard(batch)) == batch  # one process: the whole batch
    with pytest.raises(ValueError, match="does not split evenly"):
        distributed.shard(list(range(7)), 0, 2)


def test_stage3_shards_with_ddp_unless_told_fsdp_and_refuses_anything_else() -> None:
    required = ["--instructions", "i", "--manifest", "m", "--out", "o"]
    required += [arg for part in ("cfp-encoder", "oct-encoder", "cfp-head", "oct-head") for arg in (f"--{part}", "x")]
    assert config_from_args(parse_args(required)).shard == "ddp"
    assert config_from_args(parse_args([*required, "--preset", "paper", "--shard", "fsdp"])).shard == "fsdp"
    with pytest.raises(ValueError, match="shard 'zero'"):
        Stage3Config.small(shard="zero")
    # the same run sharded either way has one digest: a checkpoint of either resumes under the other
    assert Stage3Config.small(shard="fsdp").digest() == Stage3Config.small().digest()


def test_two_processes_train_stage2_like_one_and_resume_from_their_checkpoint(two: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    one = tmp_path / "one"
    train(stage2_config(one), stage2_data())
    two = two / "stage2"
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [2, 4]  # epoch 2 came from the resumed run
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=TRAIN_RTOL)
    for key in ("val_loss", "val_probe_mae"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=VAL_RTOL), key
    w1, w2 = load_file(str(one / LAST)), load_file(str(two / LAST))
    assert w1.keys() == w2.keys()
    learned = [k for k in w1 if not k.endswith(_NO_GRADIENT) and "running_" not in k and "num_batches" not in k]
    worst = max(float((w1[k].double() - w2[k].double()).abs().max()) for k in learned)
    assert worst < 1e-4, f"weights after two epochs differ by up to {worst:.2e}"


@pytest.fixture(scope="module")
def alone(two: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SFTTrainer, TrainResult]:
    """The tiny stage-3 run in one process, which both two-process runs must reproduce."""
    torch.set_num_threads(1)
    trainer = stage3_trainer(stage3_assets(two / "assets"), tmp_path_factory.mktemp("one"))
    return trainer, trainer.fit()


@pytest.mark.parametrize("run", ["stage3", "stage3-fsdp"])
def test_two_processes_train_stage3_like_one_and_resume_from_their_checkpoint(
    two: Path, alone: tuple[SFTTrainer, TrainResult], run: str, tmp_path: Path
) -> None:
    """DDP (a whole model per rank) and FSDP (the model sharded over the two ranks, its checkpoint gathered onto
    rank 0) give one process's losses; one process finishes from their checkpoints with its weights."""
    torch.set_num_threads(1)
    one, result = alone
    history = json.loads((two / run / "loss_history.json").read_text())
    assert [s for s, _ in history["train"]] == [s for s, _ in result.train_losses] == [1, 2, 3, 4]
    assert [v for _, v in history["train"]] == pytest.approx([v for _, v in result.train_losses], rel=TRAIN_RTOL)
    assert [v for _, v in history["val"]] == pytest.approx([v for _, v in result.val_losses], rel=VAL_RTOL)
    latest = Path(CHECKPOINT_DIR) / LATEST
    for name in ("trainable.safetensors", "optimizer.safetensors"):  # FSDP's gathered state: one process's keys
        assert load_file(str(two / run / latest / name)).keys() == load_file(str(one.run_dir / latest / name)).keys()
    if run == "stage3-fsdp":  # what stage 3 exports from after a sharded run: a plain copy given its weights
        copy = stage3_trainer(stage3_assets(two / "assets"), tmp_path / "copy", seed=123).model
        load_trainable(two / run / latest, copy, STAGE3_CFG.to_dict())
        a, b = dict(one.model.named_parameters()), dict(copy.named_parameters())
        worst = max(float((p - b[n]).detach().abs().max()) for n, p in a.items() if p.requires_grad)
        assert worst < 1e-5, f"the unsharded copy's trainable weights differ by up to {worst:.2e}"
    resumed = stage3_trainer(stage3_assets(two / "assets"), two / run, seed=123)  # weights all from the checkpoint
    resumed.fit()  # finished: loads the last checkpoint and trains no further
    a, b = dict(one.model.named_parameters()), dict(resumed.model.named_parameters())
    worst = max(float((p - b[n]).detach().abs().max()) for n, p in a.items() if p.requires_grad)
    assert worst < 1e-5, f"trainable weights after 4 steps differ by up to {worst:.2e}"
