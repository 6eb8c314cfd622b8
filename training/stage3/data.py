"""Stage-3 data: stage-1 instruction records -> (input_ids, labels) with cached visual tokens, batched.

Prompts and targets are built by `grok_pacs.model.prompt` only (the runtime builds its prompts there too), so
training and serving cannot drift apart: the loss falls on the assistant reply (paragraph + `Diagnosis:`
line + `<|im_end|>`) only. With `biomarker_estimates`, the human turn carries the biomarker heads'
PREDICTIONS for that eye (never the ground truth), exactly as the runtime will show them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from grok_pacs.domain.labels import Label, parse_label
from grok_pacs.model.pattern import PatternHead
from grok_pacs.model.prompt import (
    DIAGNOSIS_PREFIX,
    IGNORE_INDEX,
    IM_END,
    build_prompt,
    build_training_example,
    format_target,
)
from training.stage3.features import FeatureStore

_DIAGNOSIS_LINE = re.compile(rf"\n?\s*{re.escape(DIAGNOSIS_PREFIX)}[^\n]*\s*$")


class InstructionError(ValueError):
    """An instruction record that stage 3 cannot use; the message names the record."""


def load_instructions(path: Path) -> list[dict[str, Any]]:
    """Stage-1 records (one JSON object per line, the paper's format) from a JSONL file."""
    records = []
    with Path(path).open() as handle:
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InstructionError(f"{path}:{line_no}: not JSON: {exc}") from exc
    return records


def record_label(record: Mapping[str, Any]) -> Label:
    try:
        return parse_label(str(record["label"]))
    except (KeyError, ValueError) as exc:
        raise InstructionError(f"record {record.get('id')!r}: bad or missing label: {exc}") from exc


def assistant_text(record: Mapping[str, Any]) -> str:
    """The assistant target: the record's report paragraph, then `Diagnosis: <label>` (grok_pacs.model.prompt)."""
    turns = record.get("conversations") or []
    replies = [t["value"] for t in turns if t.get("from") in ("gpt", "assistant")]
    if len(replies) != 1:
        raise InstructionError(f"record {record.get('id')!r}: expected one assistant turn, found {len(replies)}")
    narrative = _DIAGNOSIS_LINE.sub("", replies[0]).strip()
    return format_target(narrative, record_label(record))


def chat_text(
    record: Mapping[str, Any], biomarkers: Mapping[str, float] | None = None, *, compact: bool = False
) -> str:
    """One record as the full ChatML text stage 3 trains on (prompt, report, diagnosis line, end token)."""
    return build_prompt(biomarkers, compact=compact) + assistant_text(record) + IM_END


@dataclass(frozen=True)
class SFTSample:
    record_id: str
    label: Label
    input_ids: list[int]
    labels: list[int]  #: IGNORE_INDEX on the prompt, token ids on the assistant reply
    truncated: bool


def build_samples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    features: FeatureStore,
    *,
    max_length: int,
    estimates: Mapping[str, Mapping[str, float]] | None = None,
    compact: bool = False,
    pattern: PatternHead | Mapping[str, Label] | None = None,
    pattern_subtype: bool = False,
) -> list[SFTSample]:
    """One SFT sample per record; `estimates` (record id -> head predictions) turns on the biomarker block
    (`compact`: the compact one, ending with a label line when `pattern` is given: a pattern head's closest
    label for the estimates, or a mapping record id -> the decision classifier's label; with
    `pattern_subtype` the line names the AMD subtype the estimates show)."""
    samples = []
    for record in records:
        rid = str(record["id"])
        missing = features.missing(rid)
        values = None
        if estimates is not None:
            if rid not in estimates:
                raise InstructionError(f"record {rid!r}: no biomarker estimates were computed for it")
            values = estimates[rid]
        example = build_training_example(
            tokenizer,
            assistant_text(record),
            biomarkers=values,
            missing=missing,
            max_length=max_length,
            visual_tokens=features.visual_tokens(rid),
            compact=compact,
            pattern=_line_label(rid, values, pattern),
            pattern_subtype=pattern_subtype,
        )
        samples.append(SFTSample(rid, record_label(record), example.input_ids, example.labels, example.truncated))
    return samples


def _line_label(rid: str, values: Any, pattern: PatternHead | Mapping[str, Label] | None) -> Label | None:
    """The label the prompt's last line names: the pattern head's for the estimates, or the decision
    classifier's for this record (a mapping), or none."""
    if values is None or pattern is None:
        return None
    return pattern.closest(values) if isinstance(pattern, PatternHead) else pattern[rid]


class SFTDataset(Dataset):
    """Samples with their visual tokens, read from the feature cache when indexed."""

    def __init__(self, samples: Sequence[SFTSample], features: FeatureStore) -> None:
        self.samples = list(samples)
        self.features = features

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        cfp, oct_ = self.features.tokens(sample.record_id)
        return {
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            "cfp": cfp,
            "oct": oct_,
            "record_id": sample.record_id,
        }


def collate(items: Iterable[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded input_ids / attention_mask / labels; visual tokens as per-sample lists (None = absent)."""
    items = list(items)
    width = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "cfp_tokens": [it["cfp"] for it in items],
        "oct_tokens": [it["oct"] for it in items],
        "record_ids": [it["record_id"] for it in items],
    }


def target_token_count(batch: Mapping[str, Any]) -> int:
    """Tokens that carry loss in a collated batch (labels shifted by one, as the causal-LM loss does)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
