"""The guards of every generation (fields of `grok_pacs.model.config.GenerationConfig`, for any bundle),
which `grok_pacs.analysis.decoding.Decoder` hands to transformers' `generate`:
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
  contradicting the flag; the validator still checks every text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from grok_pacs.analysis.validation import ValidationLimits
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, LABEL_SYNONYMS
from grok_pacs.domain.subtypes import WORD

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
