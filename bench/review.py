"""Review page speed: a database holding 10,000 delivered results (5,000 two-eye studies, in the results register
and the outbox, each study with its AI SR file), the page served by waitress as `grok-pacs serve` serves it,
and a logged-in clinician's requests over HTTP on loopback: the worklist (first page; filtered by label and
probability; a deep page) and study pages (each reads its AI SR file for the patient header).

Reports the median and 95th percentile of each page's response time (request sent to body read) and writes
bench/results/review.json with the machine's load (2 cores shared with other work: compare runs with care).
Target (issue #34): under 300 ms with 10,000 stored results.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import platform
import random
import re
import shutil
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from devtools.ports import free_port
from grok_pacs.config import load_settings
from grok_pacs.delivery.sender import write_result
from grok_pacs.domain.labels import Label
from grok_pacs.report.keys import derived_uid
from grok_pacs.review.accounts import Accounts, Role
from grok_pacs.review.server import ReviewServer
from grok_pacs.store import db
from grok_pacs.store.outbox import Outbox, OutboxRow
from grok_pacs.store.register import ResultRecord, ResultRegister

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "review.json"
TARGET_MS = 300.0
PASSWORD = "bench password 1"
DISPOSITIONS = ("Routine follow-up", "Refer to ophthalmology (non-urgent)", "Image quality insufficient: retake")


def _sr(study_uid: str, sr_uid: str, number: int) -> Dataset:
    """A small AI SR: what the study page reads of it is the patient and study header."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComprehensiveSRStorage, sr_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, derived_uid("bench", sr_uid, "series")
    ds.Modality, ds.PatientName, ds.PatientID = "SR", f"Bench^Patient{number}", f"BENCH-{number:05d}"
    ds.StudyDate, ds.VerificationFlag, ds.ValueType = "20261207", "UNVERIFIED", "CONTAINER"
    return ds


def fill(settings, studies: int) -> tuple[list[str], bool]:
    """Register 2 results per study (delivered) with their outbox rows and SR files; returns the study UIDs and
    whether they were added now (False: an earlier run's database in the same --work-dir)."""
    engine = db.open_engine(settings.resolved_database_url)
    register, outbox = ResultRegister(engine), Outbox(engine)
    if register.count() == 2 * studies:  # filled by an earlier run in the same --work-dir
        engine.dispose()
        return [derived_uid("bench-review", str(number)) for number in range(studies)], False
    rng = random.Random(34)
    labels = [label.value for label in Label]
    uids = []
    for start in range(0, studies, 500):
        records, rows = [], []
        for number in range(start, min(studies, start + 500)):
            study_uid = derived_uid("bench-review", str(number))
            uids.append(study_uid)
            for eye in ("R", "L"):
                sr_uid = derived_uid("bench-review", str(number), eye)
                path = str(write_result(settings.data_dir, _sr(study_uid, sr_uid, number)))
                rows.append(OutboxRow(sr_uid, study_uid, 1, "0.1.0", eye, path))
                records.append(
                    ResultRecord(
                        sr_uid, study_uid, 1, "0.1.0", eye, rng.choice(labels), round(rng.random(), 3),
                        rng.choice(DISPOSITIONS), "gradable", "", "", "",
                    )
                )  # fmt: skip
        outbox.put_many(rows)
        register.add_many(records)
        for record in records:
            register.mark_delivered(record.sr_uid, time.time())
    engine.dispose()
    return uids, True


def _client(url: str, settings) -> urllib.request.OpenerDirector:
    """A logged-in browser-like client (session cookie kept)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = opener.open(f"{url}/login").read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": "bench", "password": PASSWORD, "csrf_token": token}).encode()
    assert "/worklist" in opener.open(f"{url}/login", data=form).geturl()
    return opener


def _time(opener: urllib.request.OpenerDirector, url: str) -> float:
    started = time.perf_counter()
    with opener.open(url) as answer:
        answer.read()
        assert answer.status == 200, url
    return (time.perf_counter() - started) * 1000


def _summary(opener: urllib.request.OpenerDirector, urls: list[str]) -> dict[str, float]:
    """Wall time per request (median, p95) and this process's CPU time per request (server and client: what
    a page costs apart from waiting for a core on a loaded machine)."""
    cpu = time.process_time()
    ordered = sorted(_time(opener, url) for url in urls)
    cpu_ms = (time.process_time() - cpu) * 1000 / len(urls)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {
        "median_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(p95, 1),
        "cpu_ms_per_request": round(cpu_ms, 1),
        "requests": len(ordered),
    }


def measure(url: str, settings, studies: list[str], requests: int) -> dict[str, dict[str, float]]:
    opener = _client(url, settings)
    pages = {
        "worklist": f"{url}/worklist",
        "worklist_filtered": f"{url}/worklist?label=Glaucoma&min_p=0.5&max_p=0.9",
        "worklist_page_100": f"{url}/worklist?page=100",
    }
    rng = random.Random(1)
    for url_ in pages.values():
        _time(opener, url_)  # warm: templates compiled, connections opened
    results = {name: _summary(opener, [page] * requests) for name, page in pages.items()}
    results["study"] = _summary(opener, [f"{url}/study/{rng.choice(studies)}" for _ in range(requests)])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=10_000, help="results stored (2 per study; 10,000)")
    parser.add_argument("--requests", type=int, default=100, help="requests per page kind (100)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="grok-review-bench-"))
    try:
        report = run(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, values in report["results"].items():
        print(
            f"{name:20} median {values['median_ms']:7.1f} ms  p95 {values['p95_ms']:7.1f} ms  "
            f"cpu {values['cpu_ms_per_request']:6.1f} ms"
        )
    print(f"wrote {args.out}")


def run(args: argparse.Namespace, work: Path) -> dict:
    settings = load_settings(
        data_dir=work / "data",
        review_port=free_port(),
        review_secret_key="b" * 40,
        review_organization="Bench Clinic",
        review_cookie_secure=False,
    )
    started = time.perf_counter()
    studies, filled = fill(settings, args.results // 2)
    fill_s = time.perf_counter() - started
    Accounts(settings.resolved_database_url).set("bench", PASSWORD, Role.REVIEWER)
    load_before = os.getloadavg()[0]
    server = ReviewServer(settings, lambda uid: None).start()
    try:
        results = measure(server.url, settings, studies, args.requests)
    finally:
        server.stop()
    report = {
        "benchmark": "review page response times over HTTP (waitress, SQLite register), logged-in clinician",
        "stored_results": args.results,
        "fill_seconds": round(fill_s, 1) if filled else "reused an earlier run's database (--work-dir)",
        "target_ms": TARGET_MS,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        },
        "results": results,
        "under_target": all(value["p95_ms"] < TARGET_MS for value in results.values()),
    }
    return report


if __name__ == "__main__":
    main()
