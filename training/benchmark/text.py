"""Report-quality text overlap (docs/domain.md, Evaluation, task 2): BLEU-4 and ROUGE-L against one reference report.

Tokeniser (`tokenize`): Unicode NFKC, lower case, then runs of word characters, keeping inner `.`, `-`,
`'` and `/` between word characters, so "0.720", "cup-to-disc", "is/os" and "patient's" are one token
each and punctuation is dropped ("µm" and "μm" become the same token through NFKC).

BLEU-4 (Papineni et al. 2002): clipped n-gram precisions p1..p4, uniform weights, brevity penalty
BP = exp(1 - r/c) when c <= r (r, c: reference and candidate lengths). The corpus score sums clipped
counts and lengths over all pairs before combining (not a mean of sentence scores). Smoothing:
- "none": any p_n = 0 gives BLEU 0 (the corpus default: with a real corpus p4 is rarely 0);
- "epsilon": a zero count becomes 0.1 (Chen & Cherry 2014 method 1, NLTK `method1`; sentence default);
- "add1": p_n = (count + 1) / (total + 1) for n >= 2 (Lin & Och 2004, "BLEU+1").
ROUGE-L (Lin 2004): longest common subsequence over tokens, P = LCS/|candidate|, R = LCS/|reference|,
F = (1 + beta^2) P R / (R + beta^2 P) with beta = 1 (as Google's rouge-score reports). The whole report
is one sequence (no per-sentence union LCS): the reports are single paragraphs.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_TOKEN_RE = re.compile(r"\w+(?:[.\-'/]\w+)*")
SMOOTHING = ("none", "epsilon", "add1")
EPSILON = 0.1


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (see the module docstring)."""
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _clipped_counts(candidate: Sequence[str], reference: Sequence[str], max_n: int) -> list[tuple[int, int]]:
    """(clipped matches, candidate n-grams) for n = 1..max_n."""
    stats = []
    for n in range(1, max_n + 1):
        cand, ref = _ngrams(candidate, n), _ngrams(reference, n)
        stats.append((sum(min(count, ref[gram]) for gram, count in cand.items()), max(0, len(candidate) - n + 1)))
    return stats


def _combine(stats: list[tuple[int, int]], cand_len: int, ref_len: int, smoothing: str) -> float:
    """BLEU from summed n-gram statistics and lengths."""
    if smoothing not in SMOOTHING:
        raise ValueError(f"unknown smoothing {smoothing!r}; choose one of {SMOOTHING}")
    if cand_len == 0 or stats[0][0] == 0:
        return 0.0  # no unigram in common: 0 whatever the smoothing (as NLTK)
    log_sum = 0.0
    for n, (matches, total) in enumerate(stats, start=1):
        if smoothing == "add1" and n >= 2:
            matches, total = matches + 1, total + 1
        total = max(1, total)  # a candidate shorter than n has no n-grams: precision 0/1
        if matches == 0:
            if smoothing != "epsilon":
                return 0.0
            matches = EPSILON
        log_sum += math.log(matches / total) / len(stats)
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_sum)


def sentence_bleu(candidate: str, reference: str, smoothing: str = "epsilon", max_n: int = 4) -> float:
    """BLEU-4 of one candidate against one reference, in [0, 1]."""
    cand, ref = tokenize(candidate), tokenize(reference)
    return _combine(_clipped_counts(cand, ref, max_n), len(cand), len(ref), smoothing)


def corpus_bleu(candidates: Sequence[str], references: Sequence[str], smoothing: str = "none", max_n: int = 4) -> float:
    """Corpus BLEU-4: n-gram counts and lengths summed over all pairs, in [0, 1]."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    totals = [[0, 0] for _ in range(max_n)]
    cand_len = ref_len = 0
    for candidate, reference in zip(candidates, references):
        cand, ref = tokenize(candidate), tokenize(reference)
        for total, (matches, count) in zip(totals, _clipped_counts(cand, ref, max_n)):
            total[0] += matches
            total[1] += count
        cand_len, ref_len = cand_len + len(cand), ref_len + len(ref)
    return _combine([(m, c) for m, c in totals], cand_len, ref_len, smoothing)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986; Hyyrö 2004).

    One machine-independent big-int step per token of `b`: fast enough for 300-word reports in pure Python.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matched = row & masks.get(token, 0)
        row = ((row + matched) | (row - matched)) & full
    return len(a) - bin(row).count("1")


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure of one candidate against one reference, in [0, 1]."""
    cand, ref = tokenize(candidate), tokenize(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
