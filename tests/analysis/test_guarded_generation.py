"""Guarded, batched generation in the runtime (issue 14): numbers cannot run away, a generation ends at
its diagnosis line, both eyes of a study in one batch equal their single-eye results, and a generation
that fails validation yields the documented SR (narrative withheld, why, 37 measurements; dciodvfy clean)
and is counted in /metrics."""

from __future__ import annotations

import dataclasses
import math

import pydicom
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from devtools.tiny_bundle import TINY_NARRATIVE, build_tiny_bundle
from grok_pacs.analysis.decoding import Decoder
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.guards import DiagnosisStop, NumberGuard, PhraseGuard, malformed_number
from grok_pacs.analysis.result import REASON_TEXT, Eye, NarrativeReason
from grok_pacs.analysis.validation import validate_narrative
from grok_pacs.domain.labels import Label
from grok_pacs.ops.metrics import REGISTRY
from grok_pacs.report.sr import NARRATIVE_WITHHELD, SRKey, build_sr
from tests.helpers.eye_dicom import two_eye_study
from tests.helpers.srcheck import assert_valid_sr

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.from_bundle(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def junk_engine(tmp_path_factory):
    """An untrained tiny model: it writes junk that depends on its input, like a model that cannot write."""
    return Engine.from_bundle(
        build_tiny_bundle(tmp_path_factory.mktemp("junk") / "bundle", train_steps=0), device="cpu"
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Both eyes of one patient; the OCT pits sit at known, non-central frames."""
    return two_eye_study(tmp_path_factory.mktemp("study"))


def _with_generation(engine: Engine, **fields):
    return dataclasses.replace(engine.config, generation=dataclasses.replace(engine.config.generation, **fields))


# --- numbers -------------------------------------------------------------------------------------------------
def test_number_guard_forbids_a_second_point_and_runaway_digits(engine):
    tokenizer = engine.tokenizer
    guard = NumberGuard(tokenizer, max_digits=6)
    vocab = guard.pieces
    starts_with_digit = [i for i, piece in enumerate(vocab) if piece and piece[0] in "0123456789"]
    sentence_start = tokenizer(" The", add_special_tokens=False)["input_ids"][0]

    def banned(text: str) -> set[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        scores = guard(torch.tensor([ids]), torch.zeros(1, len(vocab)))
        return set(torch.isinf(scores[0]).nonzero().flatten().tolist())

    assert guard.tail(tokenizer("ratio of 0.375.", add_special_tokens=False)["input_ids"]) == "0.375."
    after_second_point = banned("ratio of 0.375.")
    assert set(starts_with_digit) <= after_second_point and sentence_start not in after_second_point
    assert not set(starts_with_digit) & banned("ratio of 0.72")  # a number may go on ...
    assert set(starts_with_digit) <= banned("thickness 123456")  # ... up to 6 digits
    assert not banned("The optic disc")


class _Runaway(LogitsProcessor):
    """Pushes the model to write "0.0.0.0..." forever: the failure of issue 14, at the token level."""

    def __init__(self, tokenizer) -> None:
        self.zero, self.point = (tokenizer.convert_tokens_to_ids(t) for t in ("0", "."))
        self.pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            last = self.pieces[int(input_ids[row, -1])] or ""
            scores[row, self.point if last[-1:].isdigit() else self.zero] += 1e4
        return scores


def _continue(engine, prompt: torch.Tensor, new_tokens: int, *processors) -> str:
    """The tiny LLM's greedy continuation of `prompt` (token ids [1, n]) under `processors`, never stopped."""
    out = engine.model.llm.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList(processors),
        pad_token_id=engine.decoder.pad_id,
        eos_token_id=None,
    )
    return engine.tokenizer.decode(out[0, prompt.shape[1] :])


def test_a_runaway_number_is_cut_inside_generate(engine):
    tokenizer = engine.tokenizer
    prompt = torch.tensor([tokenizer("The cup-to-disc ratio is", add_special_tokens=False)["input_ids"]])
    assert "0.0.0.0" in _continue(engine, prompt, 24, _Runaway(tokenizer))  # without the guard it runs away
    guarded = _continue(engine, prompt, 24, _Runaway(tokenizer), NumberGuard(tokenizer, max_digits=6))
    assert "0.0" in guarded and not malformed_number(guarded, 6), guarded


# --- repeated phrases ----------------------------------------------------------------------------------------
class _Looper(LogitsProcessor):
    """Pushes the model to write one phrase over and over: the repeated-phrase failure of the benchmark."""

    def __init__(self, tokenizer, phrase: str, prompt_length: int) -> None:
        self.ids, self.start = tokenizer(phrase, add_special_tokens=False)["input_ids"], prompt_length

    def __call__(self, input_ids, scores):
        scores[:, self.ids[(input_ids.shape[1] - self.start) % len(self.ids)]] += 50.0
        return scores


def test_a_looping_phrase_is_rewritten_inside_generate(engine):
    """Without the guard the text repeats its phrase and the validator would withhold it; with it the model is
    made to write something else, and the phrase rules hold."""
    tokenizer = engine.tokenizer
    prompt = torch.tensor([tokenizer("The retina shows", add_special_tokens=False)["input_ids"]])
    looper = _Looper(tokenizer, " no haemorrhages or exudates,", prompt.shape[1])

    def phrase_rule_broken(text: str) -> bool:
        return NarrativeReason.REPEATED_PHRASE in validate_narrative(text + "\nDiagnosis: Normal").reasons

    unguarded = _continue(engine, prompt, 100, looper)
    assert unguarded.count("no haemorrhages or exudates") >= 3 and phrase_rule_broken(unguarded), unguarded
    guarded = _continue(engine, prompt, 100, looper, PhraseGuard(tokenizer))
    assert guarded.count("no haemorrhages or exudates") >= 1 and not phrase_rule_broken(guarded), guarded


# --- the diagnosis line ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "finished"),
    [
        ("Findings.\nDiagnosis: Glaucoma", True),
        ("Findings.\nDiagnosis: Gl", False),
        ("Findings.\nDiagnosis: Diabetes", True),
        ("Findings.\nDiagnosis: Diabetic", False),
        ("Findings.\n**Diagnosis:** Normal", True),
        ("Findings.\nDiagnosis: no", False),
        ("The diagnosis is glaucoma", False),
        ("The differential diagnosis: glaucoma", False),
    ],
)
def test_diagnosis_stop_waits_for_a_complete_label(engine, text, finished):
    assert DiagnosisStop(engine.tokenizer).finished(text) is finished


def test_generation_ends_at_the_diagnosis_line_even_when_the_model_writes_on(engine, study):
    """With <|im_end|> not ending generation, only the stop criterion ends the report at its diagnosis."""
    item = study[Eye.RIGHT].item
    original_decoder, original_config = engine.decoder, engine.config
    never_eos = engine.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    try:
        engine.decoder = Decoder(engine.model, engine.tokenizer, never_eos, engine.device)
        stopped = engine.analyze_eye(item.eye, item.cfp, item.oct)
        engine.config = _with_generation(engine, stop_at_diagnosis=False)
        ran_on = engine.analyze_eye(item.eye, item.cfp, item.oct)
    finally:
        engine.decoder, engine.config = original_decoder, original_config
    assert stopped.raw_text.rstrip().endswith("Diagnosis: Glaucoma"), stopped.raw_text
    assert stopped.narrative_check.passed and stopped.label == Label.GLAUCOMA
    assert ran_on.raw_text.startswith(stopped.raw_text.rstrip()) and len(ran_on.raw_text) > len(stopped.raw_text) + 5


# --- batching ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["trained", "junk"])
def test_two_eyes_in_one_batch_equal_their_single_eye_results(request, study, which):
    """Left padding and masks: each row of the batch decodes and scores exactly as it would alone. The right
    eye has CFP + OCT, the left CFP only, so the rows differ in length (prompt and visual tokens)."""
    engine = request.getfixturevalue("engine" if which == "trained" else "junk_engine")
    right = study[Eye.RIGHT].item
    left = dataclasses.replace(study[Eye.LEFT].item, oct=None, sources=study[Eye.LEFT].item.sources[:1])
    batched = engine.analyze_eyes([right, left])
    single = [engine.analyze_eyes([right])[0], engine.analyze_eyes([left])[0]]
    for together, alone in zip(batched, single):
        assert together.raw_text == alone.raw_text
        assert (together.label, together.narrative, together.narrative_check) == (
            alone.label,
            alone.narrative,
            alone.narrative_check,
        )
        assert together.label_scores == pytest.approx(alone.label_scores, abs=1e-4)
    assert batched[1].missing_modalities == ("OCT",)
    if which == "trained":
        assert all(TINY_NARRATIVE.split(" 0.72")[0] in r.raw_text for r in batched)
    else:
        assert batched[0].raw_text != batched[1].raw_text  # the junk depends on the input: the rows really differ


def test_label_scores_continue_the_generation_cache_as_a_fresh_prefill_would(engine, study):
    """Scoring the labels from the generation's cache (no second prefill) gives the probabilities a fresh
    prefill of prompt + findings + "Diagnosis:" gives, for both rows of a batch of different lengths."""
    right = study[Eye.RIGHT].item
    left = dataclasses.replace(study[Eye.LEFT].item, oct=None, sources=study[Eye.LEFT].item.sources[:1])
    gen = engine.config.generation
    from grok_pacs.analysis.imaging import read_cfp, read_oct_volume

    encoded = [
        engine._encode(read_cfp(right.cfp), read_oct_volume(right.oct), {}),
        engine._encode(read_cfp(left.cfp), None, {}),
    ]
    missing = [(), ("OCT",)]
    ids = engine.decoder.encode([engine.prompt(est, gone) for (_, est, *_), gone in zip(encoded, missing)])
    cfp, oct = engine._visual([tokens for tokens, *_ in encoded])
    generation = engine.decoder.generate(ids, cfp, oct, gen, keep_cache=True)
    assert all(text.rstrip().endswith("Diagnosis: Glaucoma") for text in generation.texts), generation.texts
    from grok_pacs.analysis.parsing import parse_generation

    fresh = engine.decoder.label_scores(ids, cfp, oct, [parse_generation(t).narrative for t in generation.texts])
    cached = engine.decoder.scores_after_generation(generation)
    assert cached is not None and engine.decoder.scores_after_generation(generation) is None  # cache consumed
    for a, b in zip(cached, fresh):  # log-probabilities: the small ones (1e-9 here) must agree too
        assert {k: math.log(v) for k, v in a.items()} == pytest.approx({k: math.log(v) for k, v in b.items()}, abs=1e-3)
        assert max(a, key=a.get) == "Glaucoma"
    # Without a diagnosis line there is nothing to continue from: the caller scores the parsed narrative.
    again = engine.decoder.generate(ids, cfp, oct, gen, keep_cache=True)
    cut = dataclasses.replace(again, sequences=again.sequences[:, :5])
    assert engine.decoder.scores_after_generation(cut) is None


# --- a generation that fails validation ------------------------------------------------------------------------
def _sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_degenerate_generation_is_withheld_and_the_sr_says_why(junk_engine, engine, study, tmp_path):
    item, datasets, patient, _ = study[Eye.RIGHT]
    failed_before = _sample("grok_pacs_narratives_total", {"outcome": "failed"})
    passed_before = _sample("grok_pacs_narratives_total", {"outcome": "passed"})
    report = junk_engine.analyze_eye(item.eye, item.cfp, item.oct, sources=item.sources)
    check = report.narrative_check
    assert report.raw_text.strip() and not check.passed and report.narrative_withheld
    assert report.narrative == "" and report.cited_numbers == () and report.numbers_rewritten == 0
    best = max(report.label_scores, key=report.label_scores.get)
    min_p = report.operating_point  # the threshold the engine applied (the bundle's or the site's)
    assert min_p is not None
    scored = report.probabilities_calibrated and report.label_scores[best] >= min_p  # uncalibrated: never
    assert report.label == (Label(best) if scored else Label.INDETERMINATE)
    assert report.impression in (f"Diagnosis: {report.label.value}", "No diagnosis could be determined.")
    assert len(report.biomarkers) == 37

    path = tmp_path / "withheld.dcm"
    build_sr(report, datasets, SRKey(patient.study_uid, 1, report.bundle_version, Eye.RIGHT)).save_as(
        path, enforce_file_format=True
    )
    first = check.reasons[0]
    rendered = assert_valid_sr(
        path,
        NARRATIVE_WITHHELD,
        f"Narrative validation failed ({first.value}",
        REASON_TEXT[first],
        "The measurements are unaffected",
    )
    assert report.raw_text.strip()[:40] not in rendered  # the model's words are not shipped as findings
    nums = [item for item in _walk(pydicom.dcmread(path).ContentSequence) if item.ValueType == "NUM"]
    scores = [n for n in nums if n.ConceptNameCodeSequence[0].CodeValue.startswith("GROK-DX")]
    assert len(nums) - len(scores) == 37 and len(scores) == 1  # the biomarkers, and the diagnosis' score

    assert engine.analyze_eye(item.eye, item.cfp, item.oct).narrative_check.passed
    assert _sample("grok_pacs_narratives_total", {"outcome": "failed"}) == failed_before + 1
    assert _sample("grok_pacs_narratives_total", {"outcome": "passed"}) == passed_before + 1
    for reason in REASON_TEXT:  # every reason's series exists from the start, so rate() sees it
        assert REGISTRY.get_sample_value("grok_pacs_narrative_failures_total", {"reason": reason.value}) is not None
    assert _sample("grok_pacs_narrative_failures_total", {"reason": first.value}) >= 1


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_a_bundle_trained_without_estimates_is_prompted_without_them(tiny_bundle, study, monkeypatch):
    """The evaluation engine for such a bundle changes the prompt only: estimates still reach the report."""
    from training.stage3.evaluate import PromptWithoutEstimatesEngine

    engine, prompts = PromptWithoutEstimatesEngine.from_bundle(tiny_bundle, device="cpu"), []
    original = engine.decoder.encode
    monkeypatch.setattr(engine.decoder, "encode", lambda texts: prompts.extend(texts) or original(texts))
    item = study[Eye.RIGHT].item
    report = engine.analyze_eye(item.eye, item.cfp, item.oct)
    assert prompts and not any("Biomarker estimates" in p for p in prompts[:1])
    assert len(report.biomarkers) == 37
