"""The stand-in for a pretrained Qwen2: a tiny Qwen2 trained as a causal LM on the stage-1 report text.

STAND-IN, NOT THE PAPER'S MODEL. Qwen2-7B-Instruct cannot be brought onto these machines, and a LoRA on a
randomly initialised LLM learns nothing useful. So for the phantom cohort the project gives the LLM a
pretraining of its own: a Qwen2 of the same architecture, a few hundred thousand parameters wide, trained
(all weights) on the ChatML-formatted stage-1 conversations. Stage-3 LoRA SFT then runs on it exactly as it
would on the real model. With real weights (`Stage3Config.base_llm_dir`) this step is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, get_cosine_schedule_with_warmup

from training.stage3.config import StandInLLMConfig

log = logging.getLogger(__name__)

STAND_IN_NOTE = "stand-in: tiny Qwen2 pretrained by grok-pacs on the phantom stage-1 report text; not Qwen2-7B-Instruct"
STAND_IN_FILE = "stand_in.json"


def build_stand_in(cfg: StandInLLMConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 of the stand-in's size whose vocabulary fits `tokenizer`."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=4096,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def pretrain_stand_in(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: StandInLLMConfig,
    out_dir: Path,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Pretrain the stand-in as a causal LM on `texts` (ChatML conversations) and save it with the tokenizer."""
    out_dir = Path(out_dir)
    model = build_stand_in(cfg, tokenizer, seed)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][: cfg.max_length] for t in texts]
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(0.05 * total)), total)
    rng = random.Random(seed)
    losses: list[float] = []
    started = time.monotonic()
    model.train()
    with tqdm(total=total, desc="stage 3: stand-in LLM pretraining", unit="step", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                batch = [encoded[i] for i in order[start : start + cfg.batch_size]]
                loss = _lm_step(model, batch, tokenizer.pad_token_id)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / STAND_IN_FILE).write_text(
        json.dumps(
            {
                "note": STAND_IN_NOTE,
                "config": cfg.__dict__,
                "records": len(encoded),
                "steps": total,
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
    )
    log.info(
        "stand-in LLM pretrained: %d steps, loss %.3f -> %.3f, saved to %s",
        total,
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        out_dir,
    )
    return out_dir


def _lm_step(model: Qwen2ForCausalLM, batch: list[list[int]], pad_id: int) -> torch.Tensor:
    """Causal-LM loss on a right-padded batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
