"""Stage-1 teachers: guideline reports pass validation for every label; the HTTP teacher against a real local
chat-completions server (retries, concurrency limit, images attached, resume without repeating records)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from devtools.ports import free_port
from grok_pacs.analysis.grounding import find_citations
from grok_pacs.domain.biomarkers import BIOMARKERS, format_value
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from training.manifest import load_manifest
from training.phantom import generate_cohort
from training.phantom.sampling import sample_subject
from training.stage1.run import concluding_sentence, labels_named, run_stage1, validate_report
from training.stage1.teachers.guideline import GuidelineTeacher
from training.stage1.teachers.knowledge import load_knowledge
from training.stage1.teachers.openai_compat import ChatTeacher, TeacherError

KNOWLEDGE = load_knowledge()
PROMPT_NAMES = {b.prompt_name: b.key for b in BIOMARKERS}


def _phantom_eye(label, i: int):
    truth = sample_subject(f"S{i}", label, np.random.default_rng([5, i, DIAGNOSTIC_LABELS.index(label)]))
    eye = truth.eyes[i % 2]
    return SimpleNamespace(
        subject_id=truth.subject_id,
        eye=eye.eye,
        label=label,
        biomarkers=eye.biomarkers,
        meta={"subtype": eye.subtype} if i % 3 else {},
    )


@pytest.mark.parametrize("label", DIAGNOSTIC_LABELS)
def test_guideline_reports_pass_validation_for_every_label(label) -> None:
    teacher = GuidelineTeacher(KNOWLEDGE)
    reports = set()
    for i in range(8):
        record = _phantom_eye(label, i)
        text = teacher.write(record)
        assert validate_report(text, label, record.biomarkers) == [], text
        assert text == teacher.write(record)  # deterministic
        cited = [c for c in find_citations(text) if c.biomarker_key]
        assert len(cited) >= 5 and all(
            c.text
            == format_value(next(b for b in BIOMARKERS if b.key == c.biomarker_key), record.biomarkers[c.biomarker_key])
            for c in cited
        )
        for word in ("label", "ground truth", "was provided", "was given"):
            assert word not in text.lower()
        reports.add(text)
    openings = {r.split(".")[0] for r in reports}
    assert len(reports) == 8 and len(openings) >= 4  # varied phrasing, not one template


@pytest.mark.parametrize("label", DIAGNOSTIC_LABELS)
def test_concise_guideline_reports_list_the_flagged_estimates_then_reason_to_the_label(label) -> None:
    """The CPU preset's targets: every key estimate outside its range first (exactly as the compact prompt
    flags it), then lesions, inference and conclusion; short, grounded, and healthy to the runtime validator."""
    from grok_pacs.analysis.validation import validate_narrative
    from grok_pacs.model.prompt import COMPACT_KEYS, format_target

    teacher = GuidelineTeacher(KNOWLEDGE)
    for i in range(8):
        record = _phantom_eye(label, i)
        text = teacher.write(record, concise=True)
        assert text == teacher.write(record, concise=True) and text != teacher.write(record)
        assert len(text.split()) <= 110, text
        check = validate_narrative(format_target(text, label), record.biomarkers)
        assert check.passed, (check.summary(), text)
        findings = text.split(". ")[0]
        flagged = {
            b.key
            for b in BIOMARKERS
            if b.key in COMPACT_KEYS and not b.normal[0] <= record.biomarkers[b.key] <= b.normal[1]
        }
        cited = {c.biomarker_key for c in find_citations(findings) if c.biomarker_key}
        if flagged:
            assert cited == flagged, (findings, flagged)
            assert findings.count("(low)") + findings.count("(high)") == len(flagged)
        else:
            assert findings.startswith("All key estimates are within normal limits")
        evidence = findings.replace("normal range", "").replace("normal limits", "")
        assert not labels_named(evidence), findings  # the label comes after the evidence
        assert label in labels_named(concluding_sentence(text))


def test_guideline_report_with_a_missing_value_estimates_instead_of_inventing() -> None:
    record = _phantom_eye(DIAGNOSTIC_LABELS[1], 0)  # Glaucoma
    record.biomarkers = {**record.biomarkers, "cup_to_disc": float("nan"), "rnfl_average": float("nan")}
    text = GuidelineTeacher(KNOWLEDGE).write(record)
    assert validate_report(text, record.label, record.biomarkers) == []
    assert all(c.biomarker_key not in ("cup_to_disc", "rnfl_average") for c in find_citations(text))


class _Server:
    """A chat-completions server on 127.0.0.1 that answers like a guideline-following model."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.completed: list[str] = []
        self.fail_after: int | None = None  # 503 for everything after this many completions
        self.throttle_first = False  # 429 (Retry-After: 0) on each record's first request
        self.status: int | None = None  # answer every request with this status
        self.inflight = self.max_inflight = 0
        self.images: list[tuple[int, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload, headers = server.answer(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, path: str, body: dict) -> tuple[int, dict, dict]:
        assert path == "/v1/chat/completions"
        text = body["messages"][1]["content"][0]["text"]
        values_json = next(line for line in text.splitlines() if line.startswith('{"OCT_Measures"'))
        with self.lock:
            n = self.requests[values_json] = self.requests.get(values_json, 0) + 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            time.sleep(0.05)
            if self.status is not None:
                return self.status, {"error": {"message": "bad request"}}, {}
            if self.throttle_first and n == 1:
                return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
            if self.fail_after is not None and len(self.completed) >= self.fail_after:
                return 503, {"error": {"message": "overloaded"}}, {}
            for part in body["messages"][1]["content"][1:]:
                png = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                self.images.append(Image.open(io.BytesIO(png)).size)
            report = self._report(text, values_json)
            with self.lock:
                self.completed.append(values_json)
            usage = {
                "prompt_tokens": 1000,
                "completion_tokens": 300,
                "completion_tokens_details": {"reasoning_tokens": 50},
            }
            return 200, {"choices": [{"message": {"role": "assistant", "content": report}}], "usage": usage}, {}
        finally:
            with self.lock:
                self.inflight -= 1

    def _report(self, text: str, values_json: str) -> str:
        groups = json.loads(values_json)
        values = {PROMPT_NAMES[k]: float(v) for group in groups.values() for k, v in group.items()}
        diagnosis = text.split("The correct diagnosis for this eye is: ", 1)[1].split(". Write", 1)[0]
        label = next(lab for lab, k in KNOWLEDGE.labels.items() if k.name == diagnosis)
        record = SimpleNamespace(subject_id=values_json[-40:], eye="R", label=label, biomarkers=values, meta={})
        return GuidelineTeacher(KNOWLEDGE).write(record) + "\n"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), 3, seed=21, dicom=False, workers=1, progress=False)


def _teacher(url: str, cache: Path, **kw) -> ChatTeacher:
    return ChatTeacher(url, "o3", KNOWLEDGE, cache_dir=cache, backoff_s=0.01, timeout_s=20, **kw)


def test_http_teacher_resumes_without_repeating_finished_records(server, manifest: Path, tmp_path: Path) -> None:
    records = load_manifest(manifest)
    server.fail_after = 2  # the "interruption": the server stops answering after two reports
    first = _teacher(server.url, tmp_path / "cache", concurrency=1, max_retries=1).write_many(records, progress=False)
    done = [rid for rid, r in first.items() if isinstance(r, str)]
    assert len(done) == 2 and sum(isinstance(r, TeacherError) for r in first.values()) == 4
    assert sorted(p.stem for p in (tmp_path / "cache").glob("*.json")) == sorted(done)
    finished = list(server.completed)
    server.fail_after = None
    teacher = _teacher(server.url, tmp_path / "cache", concurrency=2)
    result = run_stage1(manifest, tmp_path / "out", teacher, progress=False)
    assert result.summary["accepted"] == 6 and result.summary["rejected"] == 0
    assert all(server.completed.count(key) == 1 for key in finished)  # never asked again
    assert len(server.completed) == 6 and teacher.usage()["cached_records"] == 2
    assert teacher.usage()["prompt_tokens"] == 4000 and teacher.usage()["reasoning_tokens"] == 200
    assert set(server.images) == {(448, 448), (256, 256)}  # the CFP and the foveal B-scan were attached
    lines = result.instructions.read_text().splitlines()
    assert {json.loads(line)["teacher"] for line in lines} == {"openai"}


def test_http_teacher_retries_throttling_within_its_concurrency_limit(server, manifest: Path, tmp_path: Path) -> None:
    records = load_manifest(manifest)
    server.throttle_first = True
    teacher = _teacher(server.url, tmp_path / "cache", concurrency=2)
    results = teacher.write_many(records, progress=False)
    assert all(isinstance(r, str) for r in results.values())
    assert teacher.usage()["retries"] == 6 and 1 < server.max_inflight <= 2


def test_http_teacher_does_not_retry_a_bad_request(server, manifest: Path, tmp_path: Path) -> None:
    record = load_manifest(manifest)[0]
    server.status = 400
    with pytest.raises(TeacherError, match="HTTP 400"):
        _teacher(server.url, tmp_path / "cache").write(record)
    assert sum(server.requests.values()) == 1


def test_amd_lesions_start_with_the_subtype_the_eye_shows() -> None:
    """The subtype word comes first ("dry, non-exudative changes: ..."), as the prompt's pattern line names
    it, so a model that copies it writes the lesions of that subtype; the estimates agree (the validator)."""
    from grok_pacs.domain.subtypes import amd_subtype, stated_subtypes

    teacher = GuidelineTeacher(KNOWLEDGE)
    seen = set()
    for i in range(12):
        record = _phantom_eye(Label.AMD, i)
        lesions = teacher.write(record, concise=True).split(". ")[1]
        shown = amd_subtype(record.biomarkers)
        kind = {"dry": "dry, non-exudative changes: ", "wet": "wet, exudative changes: "}[shown]
        assert lesions.startswith((f"The images show {kind}", f"Inspection reveals {kind}")), lesions
        assert set(stated_subtypes(lesions)) == {shown}
        seen.add(shown)
    assert seen == {"dry", "wet"}
