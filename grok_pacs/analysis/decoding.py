"""Guarded, batched decoding: several eyes' prompts in one `generate` and one label-scoring pass.

Guards (fields of `grok_pacs.model.config.GenerationConfig`, for any bundle):
- `DiagnosisStop`: a row stops once its text ends with a complete "Diagnosis: <label>" (a label no other
  label's name continues), so nothing is written after the diagnosis line;
- `NumberGuard`: a token that would give a number a second decimal point followed by a digit
  ("0.375.0") or a digit run longer than `max_number_digits` is forbidden (its logit is -inf); a point
  that ends a sentence ("0.72. The") stays allowed;
- `PhraseGuard`: the validator's repetition rules (grok_pacs.analysis.validation) applied while writing:
  a word that would write a phrase twice in a row, a 4-word phrase a sixth time or an 8-word phrase a
  third time cannot start, and a sentence that repeats an earlier one cannot end; the model writes
  something else instead of having its report withheld afterwards. It works on whole words (the
  validator's), so it never forbids a digit (a forced different digit would be a wrong number); the
  validator still checks every text;
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

from grok_pacs.analysis.validation import ValidationLimits
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


_WORD = re.compile(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*")  # the validator's words
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")  # a token that ends a sentence: ".", ". ", ".\n", "!"


class PhraseGuard(LogitsProcessor):
    """Forbids the tokens that would break the validator's repetition rules (see the module docstring).

    Per row and step: the generated text's words (as the validator reads them), the words that may not
    come next under each rule, and the tokens that would start one of them (" exud" starts "exudates").
    Only word-starting tokens are forbidden; a word the model reaches another way is left to the validator."""

    def __init__(self, tokenizer: Any, limits: ValidationLimits | None = None) -> None:
        self.limits = limits or ValidationLimits()
        self.texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.starts: dict[str, list[int]] = {}  # lower-case word (or its beginning) -> tokens " <it>..."
        self.sentence_ends: list[int] = []
        for token_id, text in enumerate(self.texts):
            if _SENTENCE_END.fullmatch(text):
                self.sentence_ends.append(token_id)
            if len(text) > 1 and text[0] == " " and text[1].isalpha():
                word = _WORD.match(text[1:].lower())
                if word is not None:
                    self.starts.setdefault(word.group(0), []).append(token_id)

    def forbidden_words(self, words: list[str]) -> set[str]:
        """The words that, written next, would break a repetition rule."""
        n, lim, out = len(words), self.limits, set()
        for size in range(lim.back_to_back_words, min(40, (n + 1) // 2) + 1):  # "x y z x y" + z
            if words[n - 2 * size + 1 : n - size] == words[n - size + 1 :]:
                out.add(words[n - size])
        for size, most in (
            (lim.short_phrase_words, lim.short_phrase_max),
            (lim.long_phrase_words, lim.long_phrase_max),
        ):
            prefix = words[n - size + 1 :] if size > 1 else []
            if n < size - 1:
                continue
            following: dict[str, int] = {}
            for i in range(n - size + 1):
                if words[i : i + size - 1] == prefix:
                    following[words[i + size - 1]] = following.get(words[i + size - 1], 0) + 1
            out |= {word for word, count in following.items() if count >= most}
        return {word for word in out if not any(c.isdigit() for c in word)}

    def tokens_starting(self, word: str) -> list[int]:
        """Tokens that begin a new word which is, or may become, `word`."""
        return [t for i in range(1, len(word) + 1) for t in self.starts.get(word[:i], ())]

    @staticmethod
    def _sentence_repeats(text: str) -> bool:
        """True when the sentence being written has the words of an earlier sentence."""
        *done, current = re.split(r"(?<=[.!?])\s+", text)
        words = _WORD.findall(current.lower())
        return bool(words) and any(_WORD.findall(s.lower()) == words for s in done)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            text = "".join(self.texts[i] for i in input_ids[row].tolist() if i < len(self.texts))
            banned = [
                t for word in self.forbidden_words(_WORD.findall(text.lower())) for t in self.tokens_starting(word)
            ]
            if not text[-1:].isdigit() and self._sentence_repeats(text):  # after a digit "." may be a decimal
                banned += self.sentence_ends
            if banned:
                scores[row, torch.tensor(banned, device=scores.device)] = float("-inf")
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
        self._phrase_guard: PhraseGuard | None = None  # built on first use (it decodes the whole vocabulary)
        self.stop = DiagnosisStop(tokenizer)

    def _guards(self, gen: GenerationConfig) -> tuple[LogitsProcessorList, StoppingCriteriaList]:
        processors = LogitsProcessorList()
        if gen.max_number_digits:
            if gen.max_number_digits not in self._number_guards:
                self._number_guards[gen.max_number_digits] = NumberGuard(self.tokenizer, gen.max_number_digits)
            processors.append(self._number_guards[gen.max_number_digits])
        if gen.phrase_guard:
            self._phrase_guard = self._phrase_guard or PhraseGuard(self.tokenizer)
            processors.append(self._phrase_guard)
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
