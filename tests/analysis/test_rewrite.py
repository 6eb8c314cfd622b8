"""The second attempt at findings that failed the validator (grok_pacs.analysis.rewrite, issue 32): the words
that failed it cannot be written again, a retry that passes is shipped and the SR says it is a second
attempt, a retry that fails too leaves the findings withheld, and `retries = 0` turns it off."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from devtools.tiny_bundle import TINY_NARRATIVE
from grok_pacs.analysis.decoding import Decoder
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.result import Eye, NarrativeCheck, NarrativeIssue, NarrativeReason
from grok_pacs.analysis.rewrite import banned_token_ids, retry_seed, words_to_avoid
from grok_pacs.domain.labels import Label
from grok_pacs.ops.metrics import REGISTRY
from grok_pacs.report.sr import SRKey, build_sr
from tests.helpers.eye_dicom import two_eye_study
from tests.helpers.srcheck import assert_valid_sr

torch.set_num_threads(1)

DRY = {"isos_rpe_central": 55.0, "mt_central": 280.0}  # no sign of wet AMD (grok_pacs.domain.subtypes)
WET = {"isos_rpe_central": 120.0, "mt_central": 340.0}


def _failed(*reasons: NarrativeReason) -> NarrativeCheck:
    return NarrativeCheck(False, tuple(NarrativeIssue(r, "") for r in reasons), 40, 0, 1.0)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.from_bundle(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return two_eye_study(tmp_path_factory.mktemp("study"))


def test_the_subtype_the_estimates_contradict_is_the_word_to_avoid():
    contradicted = _failed(NarrativeReason.CONTRADICTS_ESTIMATES)
    assert {"wet", "neovascular", "subretinal"} <= set(words_to_avoid(contradicted, DRY))
    assert "dry" not in words_to_avoid(contradicted, DRY)
    assert set(words_to_avoid(contradicted, WET)) == {"dry", "non-neovascular", "geographic"}
    # Other failures have no word to forbid (the retry samples instead); nor has an eye without estimates.
    assert words_to_avoid(_failed(NarrativeReason.CONTRADICTS_DIAGNOSIS, NarrativeReason.IMPLAUSIBLE_VALUE), DRY) == ()
    assert words_to_avoid(contradicted, {}) == ()


def test_a_forbidden_word_is_never_written(engine, study):
    """The tiny model concludes "These findings indicate glaucoma." and "Diagnosis: Glaucoma": with the word
    forbidden, in every case and spacing, neither its findings nor its diagnosis line can say it."""
    item = study[Eye.RIGHT].item
    from grok_pacs.analysis.imaging import read_cfp, read_oct_volume

    tokens, estimates, *_ = engine._encode(read_cfp(item.cfp), read_oct_volume(item.oct), {})
    ids = engine.decoder.encode([engine.prompt(estimates)])[0]
    (cfp,), (oct,) = engine._visual([tokens])
    gen = engine.config.generation
    assert "glaucoma" in engine.decoder.generate([ids], [cfp], [oct], gen).texts[0].lower()
    for seed in (retry_seed(0, ids), retry_seed(1, ids)):
        text = engine.decoder.rewrite(ids, cfp, oct, gen, ("glaucoma",), seed)
        assert "glaucoma" not in text.lower(), text
    # The same eye and seed write the same retry, and the caller's random state is left as it was.
    state = torch.random.get_rng_state()
    again = [engine.decoder.rewrite(ids, cfp, oct, gen, ("glaucoma",), retry_seed(0, ids)) for _ in range(2)]
    assert again[0] == again[1] and torch.equal(state, torch.random.get_rng_state())
    banned = banned_token_ids(engine.tokenizer, ["glaucoma"])
    assert {engine.tokenizer.decode(ids).strip() for ids in banned} == {"glaucoma", "Glaucoma"}


class _NoDiagnosisAtFirst(Decoder):
    """The first (greedy) generation cannot write its diagnosis line, so it fails validation; the retries
    (sampled) decode as the real decoder does."""

    def generate(self, prompt_ids, cfp, oct, gen, keep_cache=False, bad_words_ids=None):
        if gen.temperature == 0:
            bad_words_ids = banned_token_ids(self.tokenizer, ["Diagnosis"])
        return super().generate(prompt_ids, cfp, oct, gen, keep_cache, bad_words_ids)


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("grok_pacs_narratives_total", {"outcome": outcome}) or 0.0


def test_a_retry_that_passes_is_shipped_and_the_sr_says_so(engine, study, tmp_path):
    item, datasets, patient, _ = study[Eye.RIGHT]
    original = engine.decoder
    retried_before, failed_before = _count("retried"), _count("failed")
    try:
        engine.decoder = _NoDiagnosisAtFirst(engine.model, engine.tokenizer, original.eos_id, engine.device)
        report = engine.analyze_eye(item.eye, item.cfp, item.oct, sources=item.sources)
        engine.config = dataclasses.replace(
            engine.config, generation=dataclasses.replace(engine.config.generation, retries=0)
        )
        off = engine.analyze_eye(item.eye, item.cfp, item.oct)
    finally:
        engine.decoder = original
        engine.config = dataclasses.replace(
            engine.config, generation=dataclasses.replace(engine.config.generation, retries=2)
        )
    first = report.first_attempt
    assert first is not None and not first.passed and "Diagnosis" not in report.first_attempt_text
    assert NarrativeReason.MISSING_DIAGNOSIS in first.reasons
    assert report.narrative_check.passed and not report.narrative_withheld
    assert report.label == Label.GLAUCOMA and TINY_NARRATIVE[:40] in report.narrative
    assert report.raw_text.rstrip().endswith("Diagnosis: Glaucoma") and report.label_scores["Glaucoma"] > 0.5
    assert "retry" in report.timings_s
    # Retries off: the first verdict stands and the findings are withheld, as before retries existed.
    assert off.narrative_withheld and off.first_attempt is None and off.narrative == ""
    assert (_count("retried"), _count("failed")) == (retried_before + 1, failed_before + 1)

    path = tmp_path / "retried.dcm"
    build_sr(report, datasets, SRKey(patient.study_uid, 1, report.bundle_version, Eye.RIGHT)).save_as(
        path, enforce_file_format=True
    )
    assert_valid_sr(path, "second attempt", "missing_diagnosis", TINY_NARRATIVE[:40])
