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
  validator's), so it never forbids a digit (a forced different digit would be a wrong number); a cited
  value written again ("thickness of 62.0 µm (high), the central ...") is therefore stopped at its first
  word that is not a connector, before the number, so the model names another biomarker rather than
  contradicting the flag; the validator still checks every text;
- repetition: transformers' `no_repeat_ngram_size` and `repetition_penalty`.
Batching: prompts are left-padded with an attention mask (grok_pacs.model.grok splices the visual
tokens per row), so under greedy decoding each row's text equals its own single-eye generation.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from grok_pacs.analysis.validation import ValidationLimits
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, LABEL_SYNONYMS
from grok_pacs.domain.subtypes import WORD
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


_WORD = WORD  # the validator's words
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")  # a token that ends a sentence: ".", ". ", ".\n", "!"
_FIRST_WORD = re.compile(r"([^a-z0-9]*)([a-z].*)", re.DOTALL)  # a token's separator, then a word's letters
_JOINER = re.compile(r"[.'-]")  # joins two runs into one of the validator's words ("os-rpe", "eye's")
# The text ends outside any word: empty, or a character that is neither a letter/digit nor a joiner after one.
_BETWEEN_WORDS = re.compile(r"(?:\A|[^a-z0-9.'-]|(?<![a-z0-9])[.'-])\Z", re.IGNORECASE)


_CITATION_WORDS = 16  # the longest citation item: "the average inner nuclear layer thickness of 35.1 µm (high)"
# What may follow a cited value inside its item: a unit ("µm" is the validator's word "m") and a flag.
# Words a repeat may begin with before it names anything ("the", "and the"): connectors, not measures.
_CONNECTORS = frozenset({"the", "a", "an", "and", "or", "with", "of", "at", "in", "on", "for", "its", "while", "but"})
_CITATION_TAIL = {"m", "um", "mm", "dd", "high", "low", "normal", "raised", "reduced", "elevated", "borderline"}


def _one_citation(phrase: list[str], done: int) -> bool:
    """True when `phrase` is one cited value (its only number, followed by at most a unit and a flag) and
    the number lies beyond its first `done` words."""
    numbers = [i for i, word in enumerate(phrase) if any(c.isdigit() for c in word)]
    return len(numbers) == 1 and numbers[0] >= done and all(word in _CITATION_TAIL for word in phrase[numbers[0] + 1 :])


class PhraseGuard(LogitsProcessor):
    """Forbids the tokens that would break the validator's repetition rules (see the module docstring).

    Per row and step: the generated text's words (as the validator reads them), the words that may not
    come next under each rule, and the tokens that would start one of them (" exud" starts "exudates").
    Only word-starting tokens are forbidden; a word the model reaches another way is left to the validator."""

    def __init__(self, tokenizer: Any, limits: ValidationLimits | None = None) -> None:
        self.limits = limits or ValidationLimits()
        self.texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        # lower-case word (or its beginning) -> tokens that start it: "leading" tokens after their own
        # separator (" exud", " µm" starts the validator's word "m"), "bare" ones ("high") only where the
        # text so far ends between words ("(" + "high"); after a letter "high" would continue that word.
        self.leading: dict[str, list[int]] = {}
        self.bare: dict[str, list[int]] = {}
        self.sentence_ends: list[int] = []
        for token_id, text in enumerate(self.texts):
            if _SENTENCE_END.fullmatch(text):
                self.sentence_ends.append(token_id)
            split = _FIRST_WORD.match(text.lower())
            if split is None:
                continue
            separator, word = split.group(1), _WORD.match(split.group(2)).group(0)
            if not separator:
                self.bare.setdefault(word, []).append(token_id)
            elif not _JOINER.fullmatch(separator):  # "-rpe" / "'s" may continue a word: left to the validator
                self.leading.setdefault(word, []).append(token_id)

    def forbidden_words(self, words: list[str]) -> set[str]:
        """The words that, written next, would break a repetition rule."""
        n, lim, out = len(words), self.limits, set()
        for size in range(lim.back_to_back_words, min(40, (n + 1) // 2) + 1):  # "x y z x y" + z
            if words[n - 2 * size + 1 : n - size] == words[n - size + 1 :]:
                out.add(words[n - size])
        out |= self._repeat_through_number(words)
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

    def _repeat_through_number(self, words: list[str]) -> set[str]:
        """The next word of a cited value being written again right after itself ("the central IS/OS-RPE
        thickness of 62.0 µm (high), the central"), as soon as the repeat holds a word that is not a
        connector: stopped at "central subfield", the model could not name another biomarker and invented
        one ("central subfield geometry of 39.3 µm", the benchmark's last 2 withheld reports); stopped at
        "central", it can ("central IS/OS-RPE thickness").

        A number is never forbidden, so past it the repeat could only be broken by the unit or flag, and
        the model's next choice there is a contradiction ("62.0 µm (high), ... 62.0 µm (low)"). Stopped
        before, the model names another biomarker. Only a phrase that is one citation counts (its number
        followed by at most a unit and a flag): a template written again around a different value ("...
        is unlikely with a venular tortuosity of 1.101 AMD is unlikely with") is healthy. Any other repeat
        keeps the validator's own rule (forbidden at its last word)."""
        n, out = len(words), set()
        for size in range(self.limits.back_to_back_words, min(_CITATION_WORDS, n) + 1):
            for done in range(1, size):  # words of the second copy written so far
                start = n - done - size  # the first copy is words[start : start + size]
                if start < 0 or words[n - done :] != words[start : start + done]:
                    continue
                if all(word in _CONNECTORS or word in _CITATION_TAIL for word in words[n - done :]):
                    continue  # "(high), the" names nothing yet; "µm" belongs to the citation before it
                if _one_citation(words[start : start + size], done):
                    out.add(words[start + done])
        return out

    def tokens_starting(self, word: str, between_words: bool = True) -> list[int]:
        """Tokens that begin a new word which is, or may become, `word`; `between_words`: the text so far
        ends outside a word, so a bare token ("high") starts one too."""
        maps = (self.leading, self.bare) if between_words else (self.leading,)
        return [t for i in range(1, len(word) + 1) for index in maps for t in index.get(word[:i], ())]

    @staticmethod
    def _sentence_repeats(text: str) -> bool:
        """True when the sentence being written has the words of an earlier sentence."""
        *done, current = re.split(r"(?<=[.!?])\s+", text)
        words = _WORD.findall(current.lower())
        return bool(words) and any(_WORD.findall(s.lower()) == words for s in done)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            text = "".join(self.texts[i] for i in input_ids[row].tolist() if i < len(self.texts))
            between = _BETWEEN_WORDS.search(text) is not None
            banned = [
                t
                for word in self.forbidden_words(_WORD.findall(text.lower()))
                for t in self.tokens_starting(word, between)
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


#: The end of a diagnosis mark at a line start (what the label is scored after), DiagnosisStop's form.
_MARK_END = re.compile(r"(?:\A|\n)[ \t*_>#]*(?:final\s+)?diagnosis[ \t*_]*:\Z", re.IGNORECASE)


@dataclass
class Generation:
    """What `Decoder.generate` wrote: texts, new token ids [B, T], and (when kept) the key/value cache and
    the spliced prompt's attention mask, for `Decoder.scores_after_generation`."""

    texts: list[str]
    sequences: torch.Tensor
    cache: Any
    prompt_mask: torch.Tensor | None


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
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], cfp: list, oct: list, gen: GenerationConfig, keep_cache: bool = False
    ) -> Generation:
        """One text per row (special tokens dropped), all rows in one `generate` call; with `keep_cache`, the
        key/value cache too, so that `label_scores` can continue from the model's own diagnosis line."""
        ids, mask = _left_padded(prompt_ids, self.pad_id, self.device)
        inputs = self.model.splice(ids, mask, None, cfp, oct, padding_side="left")
        processors, stopping = self._guards(gen)
        repetition = {"no_repeat_ngram_size": gen.no_repeat_ngram_size} if gen.no_repeat_ngram_size else {}
        if gen.repetition_penalty != 1.0:
            repetition["repetition_penalty"] = gen.repetition_penalty
        with warnings.catch_warnings():
            # The n-gram guard sees the generated tokens only, as intended (a report may quote its prompt);
            # transformers warns about exactly that on every call with inputs_embeds.
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
            out = self.model.generate_spliced(
                inputs,
                max_new_tokens=gen.max_new_tokens,
                temperature=gen.temperature,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                logits_processor=processors,
                stopping_criteria=stopping,
                return_dict_in_generate=True,
                **repetition,
            )
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        if not keep_cache:
            return Generation(texts, out.sequences, None, None)
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5 calls it `cache`
        return Generation(texts, out.sequences, cache, inputs["attention_mask"])

    def _diagnosis_marks(self, sequences: torch.Tensor) -> list[int | None]:
        """Per row, the index of the generated token that ends its last "Diagnosis:" mark (None when none)."""
        marks: list[int | None] = []
        for row in sequences.tolist():
            pieces = self.tokenizer.convert_ids_to_tokens(row)
            found = None
            for i, piece in enumerate(pieces):
                if (
                    piece
                    and ":" in piece
                    and _MARK_END.search(self.tokenizer.decode(row[: i + 1], skip_special_tokens=True))
                ):
                    found = i
            marks.append(found)
        return marks

    def _options(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The 7 labels' continuations " <Label><|im_end|>", `rows` times ([rows*7, width], and their lengths)."""
        options = self.encode([f" {label.value}{IM_END}" for label in DIAGNOSTIC_LABELS])
        width = max(len(o) for o in options)
        batch = torch.full((len(options), width), self.eos_id, dtype=torch.long)
        for i, option in enumerate(options):
            batch[i, : len(option)] = torch.tensor(option)
        lengths = torch.tensor([len(o) for o in options]).repeat(rows)
        return batch.repeat(rows, 1).to(self.device), lengths.to(self.device)

    @staticmethod
    def _probabilities(logprobs: torch.Tensor, lengths: torch.Tensor, rows: int) -> list[dict[str, float]]:
        """Per row, the softmax over the 7 labels of their continuations' summed log-likelihoods."""
        keep = torch.arange(logprobs.shape[1], device=logprobs.device)[None] < lengths[:, None]
        totals = (logprobs * keep).sum(-1).view(rows, len(DIAGNOSTIC_LABELS))
        return [
            {label.value: float(p) for label, p in zip(DIAGNOSTIC_LABELS, row.softmax(0).tolist())} for row in totals
        ]

    def _cache_key(self) -> str:
        params = inspect.signature(self.model.llm.forward).parameters
        return "cache" if "cache" in params else "past_key_values"  # transformers 5 calls it `cache`

    @torch.no_grad()
    def scores_after_generation(self, generation: Generation) -> list[dict[str, float]] | None:
        """Per row, P(label | prompt, the model's own text up to its "Diagnosis:") over the 7 labels, from
        the generation's cache: no second prefill of prompt and narrative. None when a row has no diagnosis
        mark (the caller then scores the parsed narrative with `label_scores`).

        The cache is cut after the latest mark; a row whose mark comes earlier has the tokens after its
        mark masked out, and each row's mark token is fed again with the options at its own positions.
        The cache is consumed (cut and repeated): a second call returns None."""
        if generation.cache is None:
            return None
        marks = self._diagnosis_marks(generation.sequences)
        if any(mark is None for mark in marks):
            return None
        rows, k = len(marks), len(DIAGNOSTIC_LABELS)
        prompt_mask = generation.prompt_mask
        cut = max(marks)
        cache, generation.cache = generation.cache, None  # consumed: cut and repeated below
        surplus = cache.get_seq_length() - (prompt_mask.shape[1] + cut)
        if surplus > 0:
            cache.crop(-surplus)  # transformers 5: a negative count of tokens to drop from the end
        generated = torch.arange(cut, device=self.device)[None] < torch.tensor(marks, device=self.device)[:, None]
        prefix_mask = torch.cat([prompt_mask, generated.long()], 1).repeat_interleave(k, 0)
        options, lengths = self._options(rows)
        mark_tokens = generation.sequences[torch.arange(rows), torch.tensor(marks)].to(self.device)
        fed = torch.cat([mark_tokens.repeat_interleave(k, 0)[:, None], options], 1)
        start = (prompt_mask.sum(-1) + torch.tensor(marks, device=self.device)).repeat_interleave(k, 0)[:, None]
        cache.batch_repeat_interleave(k)
        out = self.model.llm(
            input_ids=fed,
            attention_mask=torch.cat([prefix_mask, torch.ones_like(fed)], 1),
            position_ids=start + torch.arange(fed.shape[1], device=self.device),
            use_cache=True,
            **{self._cache_key(): cache},
        )
        logprobs = out.logits[:, :-1].float().log_softmax(-1).gather(-1, options[..., None])[..., 0]
        return self._probabilities(logprobs, lengths, rows)

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
        first = llm(**inputs, use_cache=True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {}))
        cache = getattr(first, self._cache_key())
        batch, lengths = self._options(len(rows))  # row r's options are rows r*k .. r*k+k-1
        width = batch.shape[1]
        cache.batch_repeat_interleave(k)
        prefix_mask = inputs["attention_mask"].repeat_interleave(k, 0)
        start = prefix_mask.sum(-1, keepdim=True)  # next position of each row (left padding: its length)
        rest = llm(
            input_ids=batch,
            attention_mask=torch.cat([prefix_mask, torch.ones_like(batch)], 1),
            position_ids=start + torch.arange(width, device=self.device),
            use_cache=True,
            **{self._cache_key(): cache},
        )
        logits = torch.cat([first.logits[:, -1:].repeat_interleave(k, 0), rest.logits[:, :-1]], 1).float()
        logprobs = logits.log_softmax(-1).gather(-1, batch[..., None])[..., 0]
        return self._probabilities(logprobs, lengths, len(rows))
