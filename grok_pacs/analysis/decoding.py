"""Guarded, batched decoding: several eyes' prompts in one `generate` and one label-scoring pass.

Guards (fields of `grok_pacs.model.config.GenerationConfig`, for any bundle):
- `DiagnosisStop`: a row stops once its text ends with a complete "Diagnosis: <label>" (a label no other
  label's name continues), so nothing is written after the diagnosis line;
- `NumberGuard`: a token that would give a number a second decimal point followed by a digit
  ("0.375.0") or a digit run longer than `max_number_digits` is forbidden (its logit is -inf); a point
  that ends a sentence ("0.72. The") stays allowed;
- repetition: transformers' `no_repeat_ngram_size` and `repetition_penalty`.
Batching: prompts are left-padded with an attention mask (grok_pacs.model.grok splices the visual
tokens per row), so under greedy decoding each row's text equals its own single-eye generation.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, LABEL_SYNONYMS
from grok_pacs.model.config import GenerationConfig
from grok_pacs.model.grok import GrokModel
from grok_pacs.model.prompt import DIAGNOSIS_PREFIX, IM_END

_LEAD = re.compile(r"[0-9.]*")
_TAIL = re.compile(r"[0-9.]*$")
_TAIL_TOKENS = 16  # tokens looked back at: more than any number the guard lets through


def malformed_number(text: str, max_digits: int) -> bool:
    """True when `text` holds a number with a second decimal point before a digit, or too many digits."""
    return bool(re.search(r"\d\.\d+\.+\d", text) or re.search(rf"\d{{{max_digits + 1},}}", text))


class NumberGuard(LogitsProcessor):
    """Forbids the tokens that would make the number being written malformed (see the module docstring)."""

    def __init__(self, tokenizer: Any, max_digits: int) -> None:
        if max_digits < 1:
            raise ValueError(f"max_digits must be >= 1, got {max_digits}")
        self.max_digits = max_digits
        self.pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        groups: dict[str, list[int]] = {}
        for token_id, piece in enumerate(self.pieces):
            lead = _LEAD.match(piece or "").group(0)
            if lead:  # only tokens that start with a digit or a point can continue a number
                groups.setdefault(lead, []).append(token_id)
        self.groups = {lead: torch.tensor(ids) for lead, ids in groups.items()}

    def tail(self, ids: Sequence[int]) -> str:
        """The digits and points the text ends with (the number being written, if any)."""
        return _TAIL.search("".join(self.pieces[i] or "" for i in ids[-_TAIL_TOKENS:] if i < len(self.pieces))).group(0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            tail = self.tail(input_ids[row].tolist())
            for lead, ids in self.groups.items():
                if malformed_number(tail + lead, self.max_digits):
                    scores[row, ids.to(scores.device)] = float("-inf")
        return scores


def _complete_labels() -> set[str]:
    """Label names (lower case) after which a diagnosis line is finished: no other label's name extends them."""
    names = {label.value.lower(): label for label in DIAGNOSTIC_LABELS}
    names |= {word: label for label, words in LABEL_SYNONYMS.items() for word in words}
    return {
        name
        for name, label in names.items()
        if all(other == label for word, other in names.items() if word.startswith(name))
    }


class DiagnosisStop(StoppingCriteria):
    """Stops a row once its last line reads "Diagnosis: <label>" with a complete, unambiguous label.

    The mark must start a line (the trained format), so a "differential diagnosis: glaucoma ..." inside
    the findings does not end the report early."""

    _LINE = re.compile(r"\n[ \t*_>#]*(?:final\s+)?diagnosis[ \t*_]*[:\-][ \t*_]*([^\n]*)$", re.IGNORECASE)

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.complete = _complete_labels()

    def finished(self, text: str) -> bool:
        match = self._LINE.search(text)
        return bool(match) and match.group(1).strip().strip("*_.").lower() in self.complete

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, -_TAIL_TOKENS:], skip_special_tokens=True)
        whole = input_ids.shape[1] <= _TAIL_TOKENS  # the window holds the whole text: its start is a line start
        return torch.tensor(
            [self.finished("\n" + text if whole else text) for text in texts], dtype=torch.bool, device=input_ids.device
        )


def _left_padded(rows: Sequence[Sequence[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


class Decoder:
    """Generation and label scoring for a batch of eyes; built once per engine (the guards index the vocab)."""

    def __init__(self, model: GrokModel, tokenizer: Any, eos_id: int, device: str) -> None:
        self.model, self.tokenizer, self.eos_id, self.device = model, tokenizer, eos_id, device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
        self._number_guards: dict[int, NumberGuard] = {}
        self.stop = DiagnosisStop(tokenizer)

    def _guards(self, gen: GenerationConfig) -> tuple[LogitsProcessorList, StoppingCriteriaList]:
        processors = LogitsProcessorList()
        if gen.max_number_digits:
            if gen.max_number_digits not in self._number_guards:
                self._number_guards[gen.max_number_digits] = NumberGuard(self.tokenizer, gen.max_number_digits)
            processors.append(self._number_guards[gen.max_number_digits])
        return processors, StoppingCriteriaList([self.stop] if gen.stop_at_diagnosis else [])

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], cfp: list, oct: list, gen: GenerationConfig) -> list[str]:
        """One text per row (special tokens dropped), all rows in one `generate` call."""
        ids, mask = _left_padded(prompt_ids, self.pad_id, self.device)
        processors, stopping = self._guards(gen)
        repetition = {"no_repeat_ngram_size": gen.no_repeat_ngram_size} if gen.no_repeat_ngram_size else {}
        if gen.repetition_penalty != 1.0:
            repetition["repetition_penalty"] = gen.repetition_penalty
        with warnings.catch_warnings():
            # The n-gram guard sees the generated tokens only, as intended (a report may quote its prompt);
            # transformers warns about exactly that on every call with inputs_embeds.
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
            out = self.model.generate(
                ids,
                mask,
                cfp_tokens=cfp,
                oct_tokens=oct,
                max_new_tokens=gen.max_new_tokens,
                temperature=gen.temperature,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                logits_processor=processors,
                stopping_criteria=stopping,
                **repetition,
            )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    @torch.no_grad()
    def label_scores(
        self, prompt_ids: Sequence[Sequence[int]], cfp: list, oct: list, narratives: Sequence[str]
    ) -> list[dict[str, float]]:
        """Per row, P(label | prompt, narrative, "Diagnosis:") over the 7 labels: one batched prefill, then
        every row's 7 continuations in one batched pass over the shared cache."""
        rows = [list(p) + self.encode([f"{n}\n{DIAGNOSIS_PREFIX}"])[0] for p, n in zip(prompt_ids, narratives)]
        ids, mask = _left_padded(rows, self.pad_id, self.device)
        inputs = self.model.splice(ids, mask, None, cfp, oct, padding_side="left")
        llm, k = self.model.llm, len(DIAGNOSTIC_LABELS)
        params = inspect.signature(llm.forward).parameters
        key = "cache" if "cache" in params else "past_key_values"  # transformers 5 calls it `cache`
        first = llm(**inputs, use_cache=True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {}))
        cache = getattr(first, key)
        options = self.encode([f" {label.value}{IM_END}" for label in DIAGNOSTIC_LABELS])
        width = max(len(o) for o in options)
        batch = torch.full((k, width), self.eos_id, dtype=torch.long)
        for i, option in enumerate(options):
            batch[i, : len(option)] = torch.tensor(option)
        batch = batch.repeat(len(rows), 1).to(self.device)  # row r's options are rows r*k .. r*k+k-1
        cache.batch_repeat_interleave(k)
        prefix_mask = inputs["attention_mask"].repeat_interleave(k, 0)
        start = prefix_mask.sum(-1, keepdim=True)  # next position of each row (left padding: its length)
        rest = llm(
            input_ids=batch,
            attention_mask=torch.cat([prefix_mask, torch.ones_like(batch)], 1),
            position_ids=start + torch.arange(width, device=self.device),
            use_cache=True,
            **{key: cache},
        )
        logits = torch.cat([first.logits[:, -1:].repeat_interleave(k, 0), rest.logits[:, :-1]], 1).float()
        logprobs = logits.log_softmax(-1).gather(-1, batch[..., None])[..., 0]
        lengths = torch.tensor([len(o) for o in options], device=self.device).repeat(len(rows))
        keep = torch.arange(width, device=self.device)[None] < lengths[:, None]
        totals = (logprobs * keep).sum(-1).view(len(rows), k)
        return [
            {label.value: float(p) for label, p in zip(DIAGNOSTIC_LABELS, row.softmax(0).tolist())} for row in totals
        ]
