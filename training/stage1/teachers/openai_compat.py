"""An OpenAI-compatible chat-completions teacher (OpenAI o3, or a local vLLM / llama.cpp server).

Sends the paper's stage-1 prompt (Eye-Guideline QUESTION / rules / EXAMPLE / FORMATTING, the biomarker JSON,
the diagnosis to reach) with the CFP and the foveal B-scan attached as PNG data URLs. At most
`concurrency` requests are in flight; 429, 5xx, timeouts and dropped connections are retried with
exponential backoff (honouring Retry-After); other 4xx fail the record at once. Each finished report is
written to `cache_dir/<record id>.json` (atomically) before the next step, so an interrupted run
resumes where it stopped and never pays for a finished record twice. Token usage (prompt, completion,
reasoning) is summed per run, cached records apart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from grok_pacs.analysis.imaging import is_dicom, read_cfp, read_oct_volume
from grok_pacs.analysis.preprocess import select_foveal_bscan
from grok_pacs.domain.biomarkers import to_prompt_json
from training.manifest import CohortRecord, bscan_files
from training.stage1.teachers.knowledge import Knowledge

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0


class TeacherError(RuntimeError):
    """A record the server could not answer (after retries); the message names the record and the cause."""


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_records: int = 0
    retries: int = 0
    failures: int = 0

    def add(self, usage: dict) -> None:
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)
        details = usage.get("completion_tokens_details") or {}
        self.reasoning_tokens += int(details.get("reasoning_tokens") or 0)


def _record_id(record: CohortRecord) -> str:
    return f"{record.subject_id}_{record.eye}"


def _png_data_url(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_data_url(path: Path) -> str:
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def cfp_image(record: CohortRecord) -> str:
    """The CFP as a data URL: PNG/JPEG files as they are, DICOM decoded to PNG."""
    path = record.cfp_path
    if not is_dicom(path) and path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return _file_data_url(path)
    return _png_data_url(read_cfp(path))


def foveal_bscan_image(record: CohortRecord) -> str:
    """The foveal B-scan as a data URL: the manifest's fovea_frame when known, else grok_pacs' fovea finder."""
    path = record.oct_path
    if path.is_dir() and record.fovea_frame is not None:
        frame = bscan_files(path)[record.fovea_frame]
        if frame.suffix.lower() in (".png", ".jpg", ".jpeg"):
            return _file_data_url(frame)
    volume = read_oct_volume(path)
    index = record.fovea_frame if record.fovea_frame is not None else select_foveal_bscan(volume)[0]
    frame = volume[index]
    if frame.dtype != np.uint8:
        lo, hi = float(frame.min()), float(frame.max())
        frame = ((frame - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    return _png_data_url(frame)


def build_messages(knowledge: Knowledge, record: CohortRecord) -> list[dict]:
    """The chat messages of one record: system, then the prompt text and the two images."""
    p = knowledge.prompt
    question = (
        p.question.replace("{biomarkers_json}", to_prompt_json(record.biomarkers))
        .replace("{reference_ranges}", knowledge.reference_ranges_text())
        .replace("{diagnosis}", knowledge.labels[record.label].name)
    )
    rules = "RULES\n" + "\n".join(f"- {rule}" for rule in p.rules)
    text = "\n\n".join((question, rules, p.example, p.formatting))
    return [
        {"role": "system", "content": p.system},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": cfp_image(record)}},
                {"type": "image_url", "image_url": {"url": foveal_bscan_image(record)}},
            ],
        },
    ]


@dataclass
class ChatTeacher:
    """Reports from an OpenAI-compatible server, with a concurrency limit, retries, a cache and token accounting."""

    base_url: str
    model: str
    knowledge: Knowledge
    cache_dir: Path
    api_key: str = ""
    concurrency: int = 4
    max_retries: int = 5
    timeout_s: float = 300.0
    max_completion_tokens: int = 4096
    backoff_s: float = 1.0
    extra_body: dict = field(default_factory=dict)
    name: str = "openai"
    _usage: Usage = field(default_factory=Usage)

    def usage(self) -> dict:
        return {"model": self.model, **self._usage.__dict__}

    def write(self, record: CohortRecord) -> str:
        result = self.write_many([record], progress=False)[_record_id(record)]
        if isinstance(result, Exception):
            raise result
        return result

    def write_many(self, records: Sequence[CohortRecord], *, progress: bool = True) -> dict[str, str | Exception]:
        """id -> report (from the cache or the server) or the error that record ended with."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(self._run(records, progress))

    async def _run(self, records: Sequence[CohortRecord], progress: bool) -> dict[str, str | Exception]:
        out: dict[str, str | Exception] = {}
        todo = []
        for record in records:
            cached = self._cached(record)
            if cached is not None:
                out[_record_id(record)] = cached
                self._usage.cached_records += 1
            else:
                todo.append(record)
        gate = asyncio.Semaphore(max(1, self.concurrency))
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        bar = tqdm(total=len(todo), desc=f"stage 1 ({self.model})", unit="eye", disable=not progress)
        async with httpx.AsyncClient(
            base_url=self.base_url.rstrip("/"), headers=headers, timeout=httpx.Timeout(self.timeout_s, connect=30.0)
        ) as client:

            async def one(record: CohortRecord) -> None:
                async with gate:
                    try:
                        out[_record_id(record)] = await self._ask(client, record)
                    except (TeacherError, OSError, ValueError) as exc:  # ValueError: unreadable image
                        self._usage.failures += 1
                        out[_record_id(record)] = exc
                    bar.update()

            await asyncio.gather(*(one(r) for r in todo))
        bar.close()
        return out

    def _cache_path(self, record: CohortRecord) -> Path:
        return self.cache_dir / f"{_record_id(record)}.json"

    def _prompt_key(self, record: CohortRecord) -> str:
        """What the cached answer was asked with: model, label and biomarkers (a changed record is re-asked)."""
        text = f"{self.model}|{record.label.value}|{to_prompt_json(record.biomarkers)}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _cached(self, record: CohortRecord) -> str | None:
        path = self._cache_path(record)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # a torn file from a crash mid-write cannot happen (atomic rename); re-ask anyway
        return entry["report"] if entry.get("prompt_key") == self._prompt_key(record) else None

    def _store(self, record: CohortRecord, report: str, usage: dict) -> None:
        path = self._cache_path(record)
        tmp = path.with_suffix(".tmp")
        entry = {
            "id": _record_id(record),
            "model": self.model,
            "prompt_key": self._prompt_key(record),
            "report": report,
            "usage": usage,
        }
        tmp.write_text(json.dumps(entry, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    async def _ask(self, client: httpx.AsyncClient, record: CohortRecord) -> str:
        rid = _record_id(record)
        body = {
            "model": self.model,
            "messages": build_messages(self.knowledge, record),
            "max_completion_tokens": self.max_completion_tokens,
            **self.extra_body,
        }
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._usage.retries += 1
            try:
                self._usage.requests += 1
                response = await client.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            if response.status_code == 200:
                report, usage = _parse_completion(response, rid)
                self._usage.add(usage)
                self._store(record, report, usage)
                return report
            last = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code not in RETRY_STATUS:
                raise TeacherError(f"record {rid}: {last}")
            await asyncio.sleep(self._backoff(attempt, response.headers.get("retry-after")))
        raise TeacherError(f"record {rid}: gave up after {self.max_retries + 1} attempts; last: {last}")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), MAX_BACKOFF_S)
            except ValueError:
                pass
        return min(self.backoff_s * 2**attempt * (0.5 + random.random()), MAX_BACKOFF_S)


def _parse_completion(response: httpx.Response, rid: str) -> tuple[str, dict]:
    try:
        data = response.json()
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise TeacherError(f"record {rid}: not a chat completion: {response.text[:200]}") from exc
    if not isinstance(content, str) or not content.strip():
        raise TeacherError(f"record {rid}: the completion is empty")
    return content.strip(), data.get("usage") or {}
