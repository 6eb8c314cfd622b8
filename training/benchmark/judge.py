"""Optional LLM judge (docs/domain.md, Evaluation, task 3) over any OpenAI-compatible chat-completions endpoint.

The judge reads the reference report, the biomarker JSON and the generated report, and answers JSON
with a score and an explanation for each of the eight criteria plus the label the generated report
diagnoses. Answers are validated (every criterion present, numeric, in range; a known label); a
malformed answer, a timeout, a 429 or a 5xx is retried up to `max_attempts` times, any other HTTP error
fails at once. Configuration comes from arguments or the environment: GROK_JUDGE_BASE_URL (else
OPENAI_BASE_URL), GROK_JUDGE_MODEL, GROK_JUDGE_API_KEY (else OPENAI_API_KEY; none for local servers).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from grok_pacs.domain.biomarkers import to_prompt_json
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label, parse_label

#: Criterion -> (lowest, highest) score, in the order of docs/domain.md, Evaluation. Totals are at most 100.
CRITERIA: dict[str, tuple[int, int]] = {
    "DiagnosisAccuracy": (0, 20),
    "QuantitativeAccuracy": (0, 20),
    "QualitativeAccuracy": (0, 15),
    "EvidenceGrounding": (0, 10),
    "ReasoningConsistency": (0, 15),
    "CoverageCompleteness": (0, 10),
    "ImageBiomarkerAlignment": (0, 10),
    "ErrorSeverityPenalty": (-15, 0),
}
LABEL_FIELD = "DiagnosedLabel"
_RETRY_STATUSES = {408, 429, 500, 502, 503, 504}

SYSTEM_PROMPT = f"""You are an expert ophthalmologist grading an AI-generated retinal report.
You receive the REFERENCE report (written from the true diagnosis), the measured BIOMARKERS (JSON) and the
GENERATED report. Score the generated report on these criteria:
- DiagnosisAccuracy 0-20: 20 if its final diagnosis matches the reference diagnosis, partial credit only
  for a closely related diagnosis, 0 otherwise.
- QuantitativeAccuracy 0-20: start at 20; -1 per value 10-20% off the biomarker JSON or in a wrong unit;
  -2 per value more than 20% off; -3 per fabricated value (a number tied to no biomarker and not in the
  reference); 0 if the report states no numbers.
- QualitativeAccuracy 0-15: correctness of qualitative findings (thinning, cupping, drusen, haemorrhages).
- EvidenceGrounding 0-10: findings and conclusions are tied to specific image features or biomarkers.
- ReasoningConsistency 0-15: biomarkers -> sub-inferences -> conclusion without contradictions;
  alternatives ruled out with a finding each.
- CoverageCompleteness 0-10: +2 each for optic disc, macula/fovea, vasculature, periphery/other, OCT layers.
- ImageBiomarkerAlignment 0-10: what is said about the images agrees with the biomarkers.
- ErrorSeverityPenalty -15..0: 0 without clinically dangerous errors, down to -15 for errors that would
  mislead management.
Also give {LABEL_FIELD}: the diagnosis the GENERATED report concludes, exactly one of
{", ".join(label.value for label in DIAGNOSTIC_LABELS)}, or Indeterminate if it concludes none.
Answer with one JSON object and nothing else:
{{"DiagnosisAccuracy": {{"score": <number>, "explanation": "<one or two sentences>"}}, ... one entry per
criterion above ..., "{LABEL_FIELD}": "<label>"}}"""


class JudgeError(RuntimeError):
    """The judge could not produce a valid verdict (after retries, or a non-retryable HTTP error)."""


class JudgeAnswerError(ValueError):
    """The judge answered, but not with the JSON the rubric asks for; the message says what is wrong."""


@dataclass(frozen=True)
class JudgeVerdict:
    scores: dict[str, float]  #: criterion -> score, all of CRITERIA
    explanations: dict[str, str]
    label: Label  #: the diagnosis the judge read in the generated report

    @property
    def total(self) -> float:
        return sum(self.scores.values())


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str  #: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    max_attempts: int = 3
    backoff_s: float = 2.0  #: wait before attempt k+1 is backoff_s * 2**(k-1)
    temperature: float = 0.0
    json_mode: bool = False  #: send response_format json_object (not every server supports it)
    extra_headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> JudgeConfig:
        """Arguments first, then GROK_JUDGE_* / OPENAI_* variables; base URL and model are required."""
        env = os.environ
        values = {
            "base_url": env.get("GROK_JUDGE_BASE_URL") or env.get("OPENAI_BASE_URL"),
            "model": env.get("GROK_JUDGE_MODEL"),
            "api_key": env.get("GROK_JUDGE_API_KEY") or env.get("OPENAI_API_KEY"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        for required, variable in (("base_url", "GROK_JUDGE_BASE_URL"), ("model", "GROK_JUDGE_MODEL")):
            if not values.get(required):
                raise JudgeError(f"judge {required} not set: pass it or set {variable}")
        return cls(**values)


def build_messages(reference_text: str, biomarkers: Mapping[str, float], report_text: str) -> list[dict]:
    """The chat messages of one judgement: rubric as system, the three inputs as user."""
    user = (
        f"REFERENCE report:\n{reference_text}\n\nBIOMARKERS:\n{to_prompt_json(biomarkers)}\n\n"
        f"GENERATED report:\n{report_text}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _json_object(content: str) -> dict:
    """The JSON object in an answer, tolerating code fences and text around it."""
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", content.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise JudgeAnswerError(f"no JSON object in the answer: {content[:200]!r}")
    try:
        answer = json.loads(text[start : end + 1])
    except json.JSONDecodeError as error:
        raise JudgeAnswerError(f"answer is not valid JSON ({error}): {content[:200]!r}") from None
    if not isinstance(answer, dict):
        raise JudgeAnswerError("answer JSON is not an object")
    return answer


def _criterion(answer: dict, name: str) -> tuple[float, str]:
    """(score, explanation) of one criterion, validated against its range."""
    entry = answer.get(name)
    if not isinstance(entry, dict) or "score" not in entry:
        raise JudgeAnswerError(f"criterion {name} missing or without a score")
    score, (low, high) = entry["score"], CRITERIA[name]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise JudgeAnswerError(f"criterion {name}: score {score!r} is not a number")
    if not low <= score <= high:
        raise JudgeAnswerError(f"criterion {name}: score {score} outside {low}..{high}")
    return float(score), str(entry.get("explanation", ""))


def parse_verdict(content: str) -> JudgeVerdict:
    """Validate a judge's answer text; raises JudgeAnswerError naming the first problem."""
    answer = _json_object(content)
    parsed = {name: _criterion(answer, name) for name in CRITERIA}
    raw_label = answer.get(LABEL_FIELD, answer.get("diagnosed_label"))
    if not isinstance(raw_label, str):
        raise JudgeAnswerError(f"{LABEL_FIELD} missing or not a string: {raw_label!r}")
    try:
        label = parse_label(raw_label)
    except ValueError as error:
        raise JudgeAnswerError(f"{LABEL_FIELD}: {error}") from None
    return JudgeVerdict({k: v[0] for k, v in parsed.items()}, {k: v[1] for k, v in parsed.items()}, label)


class Judge:
    """A chat-completions client that turns (reference, biomarkers, report) into a `JudgeVerdict`."""

    def __init__(self, config: JudgeConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        headers = {"Content-Type": "application/json", **config.extra_headers}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._client = client or httpx.Client(timeout=config.timeout_s, headers=headers)
        self._url = config.base_url.rstrip("/") + "/chat/completions"

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _ask(self, messages: list[dict]) -> str:
        """One request; returns the answer text or raises (JudgeError for non-retryable HTTP errors)."""
        body: dict = {"model": self.config.model, "messages": messages, "temperature": self.config.temperature}
        if self.config.json_mode:
            body["response_format"] = {"type": "json_object"}
        response = self._client.post(self._url, json=body)
        if response.status_code in _RETRY_STATUSES:
            raise httpx.HTTPStatusError(
                f"judge HTTP {response.status_code}", request=response.request, response=response
            )
        if response.status_code != 200:
            raise JudgeError(f"judge at {self._url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise JudgeAnswerError(f"not a chat-completions response ({error!r}): {response.text[:200]}") from None

    def judge(self, reference_text: str, biomarkers: Mapping[str, float], report_text: str) -> JudgeVerdict:
        """Grade one report, retrying malformed answers and transient failures."""
        messages = build_messages(reference_text, biomarkers, report_text)
        last_error: Exception | None = None
        for attempt in range(1, self.config.max_attempts + 1):
            if attempt > 1:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 2))
            try:
                return parse_verdict(self._ask(messages))
            except (JudgeAnswerError, httpx.HTTPStatusError, httpx.TransportError) as error:
                last_error = error
        raise JudgeError(
            f"judge at {self._url} gave no valid verdict in {self.config.max_attempts} attempts; "
            f"last error: {last_error}"
        )
