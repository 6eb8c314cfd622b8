"""The repeated-phrase guard (grok_pacs.analysis.guards.PhraseGuard) on the SmolLM2 stand-in's tokenizer: it
forbids the word that would repeat a phrase or a citation, bans the tokens that start it, and never touches a
healthy report; the generation defaults fit the longest teacher report."""

from __future__ import annotations

import pytest
import torch

from grok_pacs.analysis.guards import PhraseGuard
from grok_pacs.analysis.result import NarrativeReason
from grok_pacs.analysis.validation import _WORD, validate_narrative


@pytest.fixture(scope="module")
def phrase_guard():
    """The guard on the SmolLM2 stand-in's tokenizer (the runtime's vocabulary)."""
    from transformers import AutoTokenizer

    from training.stage3.smollm import gguf_path

    path = gguf_path()
    return PhraseGuard(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True))


@pytest.mark.parametrize(
    ("text", "forbidden"),
    [
        ("the optic disc is the optic disc", {"is"}),  # 3 words twice in a row
        ("the cup is large the cup is", {"large"}),  # a 4-word phrase twice in a row
        ("the cup is large and the cup is", set()),  # not in a row
        ("".join(f"no sign of drusen in zone {c} " for c in "abcde") + "no sign of", {"drusen"}),  # 4 words, 6th
        ("a b c d e f g h z a b c d e f g h y a b c d e f g", {"h"}),  # an 8-word phrase a third time
        ("thickness of 0.35 at rest thickness of", set()),  # a number is never forbidden
        ("the macula looks healthy and the disc is pink", set()),
    ],
)
def test_phrase_guard_forbids_the_word_that_would_repeat_a_phrase(phrase_guard, text, forbidden):
    words = text.split()
    assert phrase_guard.forbidden_words(words) == forbidden
    for word in forbidden:  # exactly what the validator would withhold
        assert NarrativeReason.REPEATED_PHRASE in validate_narrative(f"{text} {word}.\nDiagnosis: Normal").reasons
    assert NarrativeReason.REPEATED_PHRASE not in validate_narrative(f"{text}.\nDiagnosis: Normal").reasons


@pytest.mark.parametrize(
    ("text", "forbidden"),
    [
        ("the central is os-rpe thickness of 62.0 m high the central", {"is"}),
        ("the central is os-rpe thickness of 62.0 m high the central is os-rpe", {"thickness"}),
        ("the central is os-rpe thickness of 62.0 m high the", set()),  # "the" alone is no repeat yet
        # The benchmark's last 2 withheld reports: stopped at "central subfield", the model wrote "central
        # subfield geometry of 39.3 µm"; stopped at "central", it can name another central measure.
        ("the central subfield thickness of 278.3 m high central", {"subfield"}),
        ("macular thickness of 302.1 m high macular", {"thickness"}),  # a measure word is no connector
        ("the central is os-rpe thickness of 62.0 m high the central subfield", set()),  # another biomarker
        ("the cup is large the cup", set()),  # no number ahead: the validator's rule, at its last word
    ],
)
def test_phrase_guard_stops_a_repeated_citation_before_its_number(phrase_guard, text, forbidden):
    """A number is never forbidden, so a citation written again (the benchmark's withheld reports) is
    stopped at its first word that is not a connector: forbidding a word after the number made the model
    contradict itself ("62.0 µm (high), ... 62.0 µm (low)"), and forbidding the third word left it no real
    biomarker to name."""
    assert phrase_guard.forbidden_words(text.split()) == forbidden


def test_phrase_guard_bans_the_tokens_that_start_the_word_and_repeated_sentence_ends(phrase_guard):
    tokenizer_texts = phrase_guard.texts

    def banned(text: str) -> set[str]:
        ids = _ids(phrase_guard, text)
        scores = phrase_guard(torch.tensor([ids]), torch.zeros(1, len(tokenizer_texts)))
        return {tokenizer_texts[i] for i in torch.isinf(scores[0]).nonzero().flatten().tolist()}

    looped = banned("There are no exudates or haemorrhages, no exudates or")
    assert {" haemorrhages", " ha"} & looped and " drusen" not in looped and " The" not in looped
    ends = banned("The macula is normal. The disc is pink. The macula is normal")
    assert {".", "!", "?"} <= ends and " and" not in ends and "," not in ends
    assert not banned("The macula is normal. The disc is pink. The vessels are normal")
    assert not banned("The cup-to-disc ratio is 0.35. The ratio is 0")  # a point after a digit may be decimal

    # The benchmark's withheld reports: "(high)" written again after a repeated citation. "high" follows
    # "(" with no space, so the bare token "high" starts the word there; after a letter it would not.
    again = "The key estimates are the central IS/OS-RPE thickness of 62.0 µm (high), the central IS/OS-RPE "
    again += "thickness of 62.0 µm ("
    assert phrase_guard.forbidden_words(_WORD.findall(again.lower())) >= {"high"}
    assert {"high", " high", "High"} <= banned(again) and "low" not in banned(again)
    inside_a_word = {phrase_guard.texts[t] for t in phrase_guard.tokens_starting("high", between_words=False)}
    assert " high" in inside_a_word and "high" not in inside_a_word  # "thig" + "high" is not the word "high"


def _ids(guard: PhraseGuard, text: str) -> list[int]:
    """Token ids of `text` for the guard (greedy longest match on its decoded vocabulary)."""
    index = {t: i for i, t in enumerate(guard.texts) if t}
    ids, at = [], 0
    while at < len(text):
        end = max(e for e in range(at + 1, min(len(text), at + 16) + 1) if text[at:e] in index)
        ids.append(index[text[at:end]])
        at = end
    return ids


def test_guard_defaults_leave_healthy_reports_alone():
    """The n-gram guard must never block a run a healthy report repeats (it would force another token, maybe a
    wrong digit), and max_new_tokens must fit the longest report, in the SmolLM2 stand-in's tokens."""
    from collections import Counter

    from transformers import AutoTokenizer

    from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
    from grok_pacs.model.config import GenerationConfig
    from tests.helpers.teacher_reports import guideline_targets
    from training.stage3.smollm import gguf_path

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    defaults, longest_repeat, longest = GenerationConfig(), 0, 0
    for label in DIAGNOSTIC_LABELS:
        for target, _ in guideline_targets(label, 4, seed=11, prefix="G"):
            ids = tokenizer(target, add_special_tokens=False)["input_ids"]
            longest = max(longest, len(ids) + 1)  # + <|im_end|>
            size = longest_repeat + 1
            while Counter(tuple(ids[j : j + size]) for j in range(len(ids) - size + 1)).most_common(1)[0][1] > 1:
                longest_repeat, size = size, size + 1
    assert 10 < longest_repeat < defaults.no_repeat_ngram_size and longest < defaults.max_new_tokens


def test_phrase_guard_never_forbids_a_word_a_healthy_report_writes(phrase_guard):
    """Along every teacher report, the word written next is never one the guard forbids, and no sentence
    end is forbidden: on healthy text the guard changes nothing."""
    import re

    from grok_pacs.analysis.parsing import parse_generation
    from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
    from tests.helpers.teacher_reports import guideline_targets

    for label in DIAGNOSTIC_LABELS:
        for target, _ in guideline_targets(label, 4, seed=11, prefix="G"):
            words = re.findall(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*", parse_generation(target).narrative.lower())
            for i in range(1, len(words)):
                assert words[i] not in phrase_guard.forbidden_words(words[:i]), (label, i, words[i])
            sentences = re.split(r"(?<=[.!?])\s+", target)
            for k in range(1, len(sentences)):
                assert not phrase_guard._sentence_repeats(" ".join(sentences[:k])[:-1]), (label, k)
