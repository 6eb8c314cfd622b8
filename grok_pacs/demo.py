"""`make demo` (interim, ingest only): a synthetic study goes in by DICOM and its job lands on the broker.

Generates one JPEG-baseline colour fundus photograph (OP) and one multi-frame OCT (OPT) per eye,
starts the listener on a free loopback port with the data directory `.demo/` (embedded broker, no
server), sends the study with grok-pacs' own C-STORE SCU, waits for the quiet period, and shows the
stored files, the index and the job message on the broker. Later issues extend this to the SR.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path
from queue import Empty

from kombu import Connection
from pydicom.uid import generate_uid

from grok_pacs.config import Peer, load_settings
from grok_pacs.index import StudyState
from grok_pacs.ingest import IngestService
from grok_pacs.logging_setup import configure_logging
from grok_pacs.sample_dicom import demo_study
from grok_pacs.scu import store_files

QUIET_PERIOD = 2.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peek_jobs(broker_url: str, queue: str) -> list[dict]:
    """The analyse jobs waiting on the broker (read and put back: the demo consumes nothing)."""
    jobs = []
    with Connection(broker_url) as conn:
        simple = conn.SimpleQueue(queue)
        messages = []
        while True:
            try:
                message = simple.get(timeout=0.5)
            except Empty:
                break
            messages.append(message)
            jobs.append({"task": message.headers["task"], "id": message.headers["id"], **message.payload[1]})
        for message in messages:
            message.requeue()
        simple.close()
    return jobs


def run(data_dir: Path) -> int:
    shutil.rmtree(data_dir, ignore_errors=True)
    settings = load_settings(data_dir=data_dir, port=_free_port(), bind_address="127.0.0.1",
                             quiet_period=QUIET_PERIOD, min_free_disk_mb=10)
    study = generate_uid()
    files = demo_study(data_dir / "sent", study)
    print(f"1. generated study {study}: {', '.join(p.name for p in files)}")
    with IngestService(settings) as service:
        peer = Peer(ae_title=settings.ae_title, host="127.0.0.1", port=service.port)
        print(f"2. listener {peer} (data {data_dir}, broker {settings.resolved_broker_url})")
        results = store_files(peer, files, calling_ae="DEMO_SCU", timeout=30)
        for result in results:
            print(f"   C-STORE {Path(result.path).name}: {result.status_name}")
        if not all(r.ok for r in results):
            print("demo FAILED: not every instance was stored", file=sys.stderr)
            return 1
        deadline = time.monotonic() + QUIET_PERIOD + 15
        while service.index.study(study).state is not StudyState.QUEUED and time.monotonic() < deadline:
            time.sleep(0.1)
        record = service.index.study(study)
        print(f"3. index: study {record.state.value} version {record.version}, {record.instance_count} instances")
        for instance in service.index.instances(study):
            print(f"   {instance.modality:4} eye {instance.laterality} frames {instance.frames:3} "
                  f"{instance.size:8} B  {instance.path}")
    jobs = _peek_jobs(settings.resolved_broker_url, settings.queue)
    print(f"4. broker queue {settings.queue!r}: {jobs}")
    ok = record.state is StudyState.QUEUED and any(job.get("study_uid") == study for job in jobs)
    print("demo OK: the study is stored durably and its analyse job is on the broker" if ok else "demo FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grok_pacs.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(".demo"), help="demo data directory (.demo)")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    return run(args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
