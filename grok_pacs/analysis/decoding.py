"""Guarded, batched decoding: several eyes' prompts in one `generate` and one label-scoring pass.

Guards (grok_pacs.analysis.guards: `DiagnosisStop`, `NumberGuard`, `PhraseGuard`) stop a row after its
diagnosis line and forbid malformed numbers and the validator's repetitions while writing; repetition is
further held back by transformers' `no_repeat_ngram_size` and `repetition_penalty`.
Batching: prompts are left-padded with an attention mask (grok_pacs.model.grok splices the visual
tokens per row), so under greedy decoding each row's text equals its own single-eye generation.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from grok_pacs.analysis.guards import DiagnosisStop, NumberGuard, PhraseGuard
from grok_pacs.analysis.rewrite import banned_token_ids
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from grok_pacs.model.config import GenerationConfig
from grok_pacs.model.grok import GrokModel
from grok_pacs.model.prompt import DIAGNOSIS_PREFIX, IM_END

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
        self,
        prompt_ids: Sequence[Sequence[int]],
        cfp: list,
        oct: list,
        gen: GenerationConfig,
        keep_cache: bool = False,
        bad_words_ids: list[list[int]] | None = None,
    ) -> Generation:
        """One text per row (special tokens dropped), all rows in one `generate` call; with `keep_cache`, the
        key/value cache too, so that `label_scores` can continue from the model's own diagnosis line.
        `bad_words_ids`: token sequences no row may write (transformers' option of that name)."""
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
                **({"bad_words_ids": bad_words_ids} if bad_words_ids else {}),
            )
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        if not keep_cache:
            return Generation(texts, out.sequences, None, None)
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5 calls it `cache`
        return Generation(texts, out.sequences, cache, inputs["attention_mask"])

    def rewrite(
        self, prompt_ids: Sequence[int], cfp: Any, oct: Any, gen: GenerationConfig, avoid: Sequence[str], seed: int
    ) -> str:
        """One eye's second attempt (grok_pacs.analysis.rewrite): alone, sampled at `gen.retry_temperature` from
        `seed` (the caller's random state is left as it was), never writing the words `avoid`."""
        retry = dataclasses.replace(gen, temperature=gen.retry_temperature)
        banned = banned_token_ids(self.tokenizer, avoid) or None
        cuda = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            return self.generate([prompt_ids], [cfp], [oct], retry, bad_words_ids=banned).texts[0]

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
