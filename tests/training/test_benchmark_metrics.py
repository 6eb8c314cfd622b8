"""Benchmark metrics (training.benchmark) on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grok_pacs.analysis.result import BiomarkerEstimate, Eye, Report
from grok_pacs.domain.labels import Label
from training.benchmark import Prediction, Reference, compare, evaluate, write_comparison, write_report
from training.benchmark.classification import classify, plot_confusion
from training.benchmark.grounding import check_grounding, check_model_grounding, check_report_grounding
from training.benchmark.judge import CRITERIA, Judge, JudgeAnswerError, JudgeConfig, JudgeError, parse_verdict
from training.benchmark.rubric import coverage_completeness, diagnosis_accuracy, quantitative_accuracy
from training.benchmark.text import corpus_bleu, lcs_length, rouge_l, sentence_bleu, tokenize

A, G, N, D = Label.AMD, Label.GLAUCOMA, Label.NORMAL, Label.DIABETES
CAT, REF_CAT = "The cat sat on the mat.", "the cat is on the mat"


# --- classification -----------------------------------------------------------------------------------
def test_macro_f1_on_a_small_confusion() -> None:
    result = classify([A, A, G, G, N, N], [A, G, G, Label.INDETERMINATE, N, A])
    scores = {s.label: s for s in result.per_label}
    assert (scores["AMD"].precision, scores["AMD"].recall, scores["AMD"].f1) == (0.5, 0.5, 0.5)
    assert (scores["Normal"].precision, scores["Normal"].recall) == (1.0, 0.5)
    assert scores["Normal"].f1 == pytest.approx(2 / 3)
    assert result.macro_f1 == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)  # absent labels are not averaged
    assert result.accuracy == 0.5 and result.indeterminate == 1
    assert result.confusion[1][7] == 1  # Glaucoma row, Indeterminate column


def test_label_predicted_but_never_true_lowers_macro_f1() -> None:
    result = classify([A, A], [A, D])
    assert result.macro_f1 == pytest.approx((2 / 3 + 0.0) / 2)


def test_reference_must_be_a_diagnostic_label() -> None:
    with pytest.raises(ValueError, match="Indeterminate"):
        Reference("x", Label.INDETERMINATE, "", {})


def test_reference_biomarkers_from_prompt_json() -> None:
    from grok_pacs.domain.biomarkers import to_prompt_json
    from training.records import biomarkers_from_prompt_json

    values = {"cup_to_disc": 0.72, "rnfl_average": 24.1, "mt_inner_inferior": 355.0}
    assert biomarkers_from_prompt_json(to_prompt_json(values)) == values
    with pytest.raises(ValueError, match="Cup size"):
        biomarkers_from_prompt_json({"CFP_Measures": {"Cup size": "1"}})


def test_confusion_png_is_written(tmp_path) -> None:
    import matplotlib.image

    path = plot_confusion(classify([A, G], [A, Label.INDETERMINATE]), tmp_path / "c.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[0] > 300


# --- text overlap -------------------------------------------------------------------------------------
def test_tokenizer_keeps_numbers_and_hyphenated_words() -> None:
    tokens = ["cup-to-disc", "ratio", "0.720", "rnfl", "24.1", "μm"]
    assert tokenize("Cup-to-disc ratio: 0.720, RNFL 24.1 µm.") == tokens
    assert tokenize("24.1 µm") == tokenize("24.1 μm")


def test_sentence_bleu_hand_computed() -> None:
    # p1 5/6, p2 3/5, p3 1/4, p4 0/3; equal lengths so BP = 1.
    assert sentence_bleu(CAT, REF_CAT, smoothing="none") == 0.0
    assert sentence_bleu(CAT, REF_CAT) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    assert sentence_bleu(CAT, REF_CAT, smoothing="add1") == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    assert sentence_bleu(REF_CAT, REF_CAT) == pytest.approx(1.0)


def test_bleu_brevity_penalty() -> None:
    # "the cat": p1 = p2 = 1, no 3- or 4-grams (0.1/1 each with epsilon); BP = exp(1 - 6/2).
    assert sentence_bleu("the cat", REF_CAT) == pytest.approx(2.718281828 ** (1 - 3) * (0.1 * 0.1) ** 0.25)


def test_corpus_bleu_pools_counts() -> None:
    value = corpus_bleu([CAT, "a b c d e"], [REF_CAT, "a b c d e"])
    assert value == pytest.approx((10 / 11 * 7 / 9 * 4 / 7 * 2 / 5) ** 0.25)
    with pytest.raises(ValueError):
        corpus_bleu([CAT], [])


def test_rouge_l_hand_computed() -> None:
    assert rouge_l(CAT, REF_CAT) == pytest.approx(5 / 6)
    assert rouge_l("a b c d", "a x c y d z") == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert rouge_l("", REF_CAT) == 0.0


def test_bit_parallel_lcs_equals_dynamic_programming() -> None:
    def dp(a, b):
        row = [0] * (len(b) + 1)
        for x in a:
            prev = 0
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
        return row[-1]

    rng = random.Random(7)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        assert lcs_length(a, b) == dp(a, b)


# --- judge-free rubric --------------------------------------------------------------------------------
MEASURED = {"cup_to_disc": 0.70, "rnfl_average": 25.0, "avr": 0.60, "mt_central": 300.0}
CRAFTED = (
    "The cup-to-disc ratio is 0.72 and RNFL thickness 28.5 um; the AVR of 0.80 and central subfield "
    "thickness 300 mm; GCIPL 70 um; IOP 21 mmHg."
)


def test_quantitative_deductions_on_a_crafted_report() -> None:
    score, deductions, n = quantitative_accuracy(CRAFTED, MEASURED)
    reasons = [(d.text, d.reason, d.points) for d in deductions]
    assert reasons == [
        ("28.5", "10-20% off", 1),
        ("0.80", ">20% off", 2),
        ("300", "wrong unit", 1),
        ("70", "fabricated", 3),
        ("21", "fabricated", 3),
    ]
    assert (score, n) == (20 - 10, 6)
    assert quantitative_accuracy(CRAFTED, MEASURED, reference_text="IOP was 21 mmHg.")[0] == 13


def test_quantitative_zero_without_numbers_and_never_negative() -> None:
    assert quantitative_accuracy("The disc looks cupped.", MEASURED)[0] == 0
    assert (
        quantitative_accuracy(
            "GCIPL 70, INL 30, RPE 20, ELM-ISOS 22, ISOS-RPE 40, IOP 21 mmHg, age 70 years.", MEASURED
        )[0]
        == 0
    )
    assert quantitative_accuracy("The cup-to-disc ratio of 0.700.", MEASURED)[0] == 20


def test_ratio_with_length_unit_is_a_wrong_unit() -> None:
    _, deductions, _ = quantitative_accuracy("cup-to-disc ratio 0.70 um", MEASURED)
    assert [(d.reason, d.points) for d in deductions] == [("wrong unit", 1)]


def test_coverage_by_region() -> None:
    assert coverage_completeness("Normal-looking optic disc and macula.") == 4
    full = "Optic disc cupped; fovea flat; arterioles narrowed; no haemorrhages in the periphery; RNFL thin."
    assert coverage_completeness(full) == 10
    assert coverage_completeness("Discussed with the patient.") == 0


def test_diagnosis_accuracy() -> None:
    assert diagnosis_accuracy(G, G) == 20
    assert diagnosis_accuracy(A, G) == 0
    assert diagnosis_accuracy(Label.INDETERMINATE, G) == 0


# --- grounding ----------------------------------------------------------------------------------------
def test_grounding_against_the_sr_estimates() -> None:
    estimates = {"cup_to_disc": 0.7204, "rnfl_average": 24.13, "avr": 0.61, "disc_diameter_vertical": 1823.0}
    text = (
        "cup-to-disc ratio of 0.720, RNFL thickness 24.1 µm, AVR 0.65, GCIPL 70 um, vertical disc "
        "diameter 1.82 mm, IOP 21 mmHg."
    )
    result = check_grounding(text, estimates)
    assert (result.n_cited, result.n_agree) == (6, 3)
    assert result.agreement == pytest.approx(0.5)
    assert [(m.text, m.reason) for m in result.mismatches] == [
        ("0.65", "disagrees"),
        ("70", "no estimate"),
        ("21", "unmatched"),
    ]
    assert check_grounding("RNFL 24.2 um", estimates).agreement == 0.0  # 24.13 rounds to 24.1
    assert check_grounding("No numbers.", estimates).agreement is None


def runtime_report(narrative: str, estimates: dict[str, float], raw_text: str | None = None) -> Report:
    return Report(
        eye=Eye.RIGHT,
        label=G,
        narrative=narrative,
        impression="Consistent with glaucoma.",
        raw_text=narrative if raw_text is None else raw_text,
        biomarkers=tuple(BiomarkerEstimate(k, v, "1") for k, v in estimates.items()),
        cited_numbers=(),
        label_scores={},
        missing_modalities=("OCT",),
        sources=(),
        oct_frame_index=None,
        oct_frame_method=None,
        bundle_name="b",
        bundle_version="0",
    )


def test_grounding_and_prediction_from_a_runtime_report() -> None:
    report = runtime_report("The cup-to-disc ratio is 0.812 and the AVR 0.70.", {"cup_to_disc": 0.8121, "avr": 0.64})
    result = check_report_grounding(report)
    assert (result.n_cited, result.n_agree, result.mismatches[0].reason) == (2, 1, "disagrees")
    prediction = Prediction.from_report("case-1", report)
    assert prediction.label == G and prediction.text.endswith("Consistent with glaucoma.")
    assert prediction.biomarkers == {"cup_to_disc": 0.8121, "avr": 0.64}
    # A report that does not state the findings' label (below the operating point) is scored on that label.
    unstated = dataclasses.replace(
        report,
        label=Label.INDETERMINATE,
        unsupported_label=G,
        impression="No diagnosis is stated: the classifier's probability for Glaucoma, 0.49, is below 0.67.",
    )
    ruled = Prediction.from_report("case-1", unstated)
    assert ruled.label == G
    # The label rule's sentence is the runtime's, not the model's: no text metric or grounding reads it.
    assert ruled.text == report.narrative and "0.49" not in ruled.text
    assert check_grounding(ruled.text, ruled.biomarkers).n_cited == 2


def test_model_grounding_reads_what_the_model_wrote_not_the_served_text() -> None:
    """The runtime writes misquoted numbers as the estimates; the benchmark still sees the model's own."""
    raw = "The cup-to-disc ratio is 0.700 and the AVR 0.64.\nDiagnosis: Glaucoma"
    report = runtime_report(
        "The cup-to-disc ratio is 0.812 and the AVR 0.64.", {"cup_to_disc": 0.8121, "avr": 0.64}, raw_text=raw
    )
    assert check_report_grounding(report).agreement == 1.0
    model = check_model_grounding(report)
    assert (model.n_cited, model.n_agree) == (2, 1)
    assert [(m.text, m.biomarker_key) for m in model.mismatches] == [("0.700", "cup_to_disc")]


# --- LLM judge ----------------------------------------------------------------------------------------
def verdict_json(**overrides) -> str:
    answer = {name: {"score": high, "explanation": f"{name} ok"} for name, (_, high) in CRITERIA.items()}
    answer["DiagnosedLabel"] = "glaucoma"
    answer.update(overrides)
    return json.dumps(answer)


def test_parse_verdict_and_malformed_answers() -> None:
    verdict = parse_verdict("```json\n" + verdict_json() + "\n```")
    assert verdict.label == G and verdict.total == 100
    for bad, message in [
        ("I think it is fine.", "no JSON object"),
        ('{"DiagnosisAccuracy": ', "no JSON object"),
        (verdict_json(QualitativeAccuracy={"score": 16, "explanation": ""}), "QualitativeAccuracy.*outside"),
        (verdict_json(ErrorSeverityPenalty={"score": "-3"}), "not a number"),
        (verdict_json(DiagnosedLabel="retinitis"), "DiagnosedLabel"),
    ]:
        with pytest.raises(JudgeAnswerError, match=message):
            parse_verdict(bad)


class ScriptedServer:
    """A loopback chat-completions server answering from a script of (status, content) pairs."""

    def __init__(self, script: list[tuple[int, str]]) -> None:
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                status, content = outer.script.pop(0)
                payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                data = json.dumps(payload if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def config(self, **kw) -> JudgeConfig:
        return JudgeConfig(
            base_url=f"http://127.0.0.1:{self.server.server_port}/v1",
            model="judge-x",
            api_key="k",
            timeout_s=5,
            backoff_s=0.0,
            **kw,
        )


def test_judge_retries_malformed_and_server_errors() -> None:
    script = [(200, "not json"), (503, "busy"), (200, verdict_json())]
    with ScriptedServer(script) as server, Judge(server.config()) as judge:
        verdict = judge.judge("Reference: glaucoma.", {"cup_to_disc": 0.8}, "Generated: glaucoma.")
    assert verdict.label == G and verdict.scores["DiagnosisAccuracy"] == 20
    path, auth, body = server.requests[0]
    assert len(server.requests) == 3 and path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "judge-x" and "QuantitativeAccuracy" in body["messages"][0]["content"]
    assert '"cup-to-disc ratio": "0.800"' in body["messages"][1]["content"]


def test_judge_config_from_env(monkeypatch) -> None:
    for name in ("GROK_JUDGE_BASE_URL", "OPENAI_BASE_URL", "GROK_JUDGE_MODEL", "GROK_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(JudgeError, match="GROK_JUDGE_MODEL"):
        JudgeConfig.from_env(base_url="http://127.0.0.1:1/v1")
    monkeypatch.setenv("GROK_JUDGE_MODEL", "m")
    monkeypatch.setenv("OPENAI_API_KEY", "sk")
    config = JudgeConfig.from_env(base_url="http://127.0.0.1:1/v1")
    assert (config.model, config.api_key) == ("m", "sk")


def test_judge_gives_up_with_the_reason() -> None:
    bad = verdict_json(CoverageCompleteness={"score": 12})
    with ScriptedServer([(200, bad)] * 2) as server, Judge(server.config(max_attempts=2)) as judge:
        with pytest.raises(JudgeError, match="CoverageCompleteness"):
            judge.judge("r", {}, "g")
    with ScriptedServer([(401, "bad key")]) as server, Judge(server.config()) as judge:
        with pytest.raises(JudgeError, match="401"):
            judge.judge("r", {}, "g")
    assert len(server.requests) == 1  # an auth error is not retried


# --- end to end ---------------------------------------------------------------------------------------
def cases() -> tuple[list[Prediction], list[Reference]]:
    ref_text = "The optic disc shows a cup-to-disc ratio of 0.80 with RNFL thinning to 22.0 um; glaucoma."
    refs = [
        Reference("1", G, ref_text, {"cup_to_disc": 0.80, "rnfl_average": 22.0}),
        Reference("2", N, "Normal macula and optic disc.", {"cup_to_disc": 0.30}),
    ]
    preds = [
        Prediction("2", N, "Normal optic disc and macula, cup-to-disc ratio 0.30.", {"cup_to_disc": 0.3}),
        Prediction("1", A, "Drusen at the macula; RNFL 22.0 um.", {"rnfl_average": 21.96}),
    ]
    return preds, refs


def test_evaluate_write_and_compare(tmp_path) -> None:
    preds, refs = cases()
    result = evaluate(preds, refs, progress=False)
    summary = result.summary()
    assert [c.case_id for c in result.cases] == ["1", "2"]
    assert summary["accuracy"] == 0.5 and summary["rubric_diagnosis"] == 10.0
    assert summary["grounding_agreement_pooled"] == 1.0
    paths = write_report(result, tmp_path, "Run A")
    saved = json.loads(paths["json"].read_text())
    assert saved["summary"]["macro_f1"] == pytest.approx(result.classification.macro_f1)
    assert "| Glaucoma |" in paths["markdown"].read_text() and paths["png"].exists()

    better = evaluate([Prediction("1", G, refs[0].text, {}), preds[0]], refs, progress=False)
    rows = {m: (a, b, d) for m, a, b, d in compare(result, better, ("without", "with")).rows}
    assert rows["accuracy"] == (0.5, 1.0, 0.5)
    table = write_comparison(result, better, tmp_path, "Biomarkers in prompt", ("without", "with"))
    assert "| accuracy | 0.5000 | 1.0000 | +0.5000 |" in table["markdown"].read_text()


def test_evaluate_with_judge_counts_failures() -> None:
    preds, refs = cases()
    half = verdict_json(QualitativeAccuracy={"score": 7.5, "explanation": "partial"})
    with ScriptedServer([(200, half), (200, "no"), (200, "still no")]) as server:
        with Judge(server.config(max_attempts=2)) as judge:
            result = evaluate(preds, refs, judge=judge, progress=False)
    assert result.judge_failures == 1 and result.cases[1].judge_error is not None
    assert result.judge_means["QualitativeAccuracy"] == 7.5 and result.judge_means["total"] == 92.5
    assert result.summary()["judge_macro_f1"] == result.judge_classification.macro_f1


def test_evaluate_rejects_unpaired_cases() -> None:
    preds, refs = cases()
    with pytest.raises(ValueError, match="no prediction for \\['2'\\]"):
        evaluate(preds[1:], refs, progress=False)
