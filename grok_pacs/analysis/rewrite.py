"""The second attempt at an eye's findings when the first fails the validator (issue 32).

A withheld narrative leaves the clinician without findings for that eye. On the phantom benchmark about
one generation in ten failed, most of them for one wrong word: the AMD subtype the estimates contradict
("dry" over a fluid-filled fovea), or a concluding sentence that argues for another label than the
diagnosis line ("... supports hypertensive retinopathy." then "Diagnosis: AMD"). So a failed eye is written
again, alone, up to `GenerationConfig.retries` times (default 2):
- the words that failed it cannot be written again (`words_to_avoid`: the subtype the estimates
  contradict), through transformers' `bad_words_ids`;
- it samples (`retry_temperature`) from a seed fixed per eye, so a failure with no word to forbid gets
  another text, and the same images give the same retry on the same machine. A conclusion that argued for
  another label is not fixed by forbidding that label's name: the model would argue the same without
  naming it, and the validator would no longer see it. Sampling lets it conclude otherwise, or not.
The retry passes the same validator; if it fails too, the narrative stays withheld as before. Nothing
is rewritten by hand: every shipped word is the model's. The report keeps the first attempt's verdict
(`Report.first_attempt`), and the SR says the findings are a second attempt, and why.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from grok_pacs.analysis.parsing import parse_generation
from grok_pacs.analysis.result import Eye, NarrativeCheck, NarrativeReason
from grok_pacs.domain.subtypes import SUBTYPE_CUES, amd_subtype
from grok_pacs.model.config import GenerationConfig
from grok_pacs.ops import metrics

log = logging.getLogger(__name__)


def words_to_avoid(check: NarrativeCheck, estimates: Mapping[str, float]) -> tuple[str, ...]:
    """The words the second attempt may not write, from what failed the first (may be empty)."""
    words: list[str] = []
    if NarrativeReason.CONTRADICTS_ESTIMATES in check.reasons:
        shown = amd_subtype(estimates)
        if shown is not None:
            other = "dry" if shown == "wet" else "wet"
            words += [cue[0] for cue in SUBTYPE_CUES[other]]
    return tuple(dict.fromkeys(w for w in words if w))


def banned_token_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Token sequences for each word as it may start a word in running text: after a space or not, in lower
    case and capitalised (the forms the stage-1 reports write); transformers' `bad_words_ids` format."""
    sequences: dict[tuple[int, ...], None] = {}
    for word in words:
        for form in {word.lower(), word.lower().capitalize(), word}:
            for text in (form, " " + form):
                ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
                if ids:
                    sequences[ids] = None
    return [list(ids) for ids in sequences]


def retry_seed(base: int, prompt_ids: Sequence[int]) -> int:
    """A seed fixed by the eye's prompt (its estimates) and the configured base: the same eye, the same retry."""
    return (base * 1_000_003 + zlib.crc32(bytes(str(list(prompt_ids)), "ascii"))) % (2**31)


def retry_failed(
    decoder: Any,
    gen: GenerationConfig,
    rows: Sequence[tuple[Sequence[int], Any, Any]],
    estimates: Sequence[Mapping[str, float]],
    checks: Sequence[NarrativeCheck],
    validate: Callable[[int, str], NarrativeCheck],
) -> dict[int, tuple[str, NarrativeCheck]]:
    """Second attempts at the rows whose first generation failed: row -> (text, check) of the attempt that
    passed. `rows` are (prompt ids, CFP tokens, OCT tokens) per row; `validate(row, text)` checks a text.
    A row whose every attempt fails is absent (its first verdict stands)."""
    passed: dict[int, tuple[str, NarrativeCheck]] = {}
    for i, first in enumerate(checks):
        if first.passed:
            continue
        prompt_ids, cfp, oct = rows[i]
        avoid, check = (), first
        for attempt in range(gen.retries):
            avoid = tuple(dict.fromkeys(avoid + words_to_avoid(check, estimates[i])))  # what every failure showed
            text = decoder.rewrite(prompt_ids, cfp, oct, gen, avoid, retry_seed(gen.retry_seed + attempt, prompt_ids))
            check = validate(i, text)
            if check.passed:
                passed[i] = (text, check)
                break
    return passed


def second_attempts(
    decoder: Any,
    gen: GenerationConfig,
    eyes: Sequence[Eye],
    rows: Sequence[tuple[Sequence[int], Any, Any]],
    estimates: Sequence[Mapping[str, float]],
    batch: tuple[list[str], list[NarrativeCheck], list[dict[str, float]]],
    validate: Callable[[int, str], NarrativeCheck],
) -> dict[int, tuple[NarrativeCheck, str]]:
    """The engine's step after validation: retry the failed rows of a batch; a row whose retry passed gets its
    text, check and (when the batch has them) label scores replaced in `batch` (texts, checks, raw scores),
    so the scores follow the findings shipped. Counts each eye's outcome in /metrics. Returns row -> the
    first attempt's check and text, for the rows replaced."""
    raws, checks, raw_scores = batch
    retried = retry_failed(decoder, gen, rows, estimates, checks, validate)
    for i, check in enumerate(checks):
        metrics.narrative_outcome("retried" if i in retried else "passed" if check.passed else "failed")
        if not check.passed and i not in retried:
            log.warning("eye %s: narrative withheld, every attempt failed validation", eyes[i].value)
    firsts = {i: (checks[i], raws[i]) for i in retried}
    for i, (text, check) in retried.items():
        raws[i], checks[i] = text, check
        log.info("eye %s: a second attempt at its findings passed validation", eyes[i].value)
    if retried and gen.score_labels:
        order = sorted(retried)
        fresh = decoder.label_scores(
            *([rows[i][k] for i in order] for k in range(3)), [parse_generation(raws[i]).narrative for i in order]
        )
        for i, row_scores in zip(order, fresh):
            raw_scores[i] = row_scores
    return firsts
