"""Helpers shared by the ingest tests: settings on free loopback ports, DCMTK runs, broker inspection."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Empty

from kombu import Connection

from devtools.ports import free_port
from devtools.sample_dicom import fundus_rgb, jpeg_bytes
from grok_pacs.config import Settings, load_settings
from grok_pacs.ingest.service import IngestService
from grok_pacs.jobs.publisher import JobPublisher
from tests.conftest import require_tool

# Debian's DCMTK keeps Nagle's algorithm on unless TCP_NODELAY=1 is set (40 ms stalls per small message).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
AE = "GROK_PACS"


def ingest_settings(tmp_path: Path, **overrides) -> Settings:
    values = {
        "data_dir": tmp_path / "data",
        "port": free_port(),
        "bind_address": "127.0.0.1",
        "quiet_period": 0.5,
        "min_free_disk_mb": 1,
        "acse_timeout": 10,
        "dimse_timeout": 20,
        "network_timeout": 20,
    }
    values.update(overrides)
    return load_settings(**values)


@contextmanager
def running(settings: Settings) -> Iterator[IngestService]:
    service = IngestService(settings, JobPublisher(settings))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a DCMTK tool (must be installed) and return the completed process."""
    return subprocess.run([require_tool(tool), *args], capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def storescu(
    port: int, *files: Path, options: tuple[str, ...] = (), calling: str = "TESTSCU", timeout: float = 60
) -> subprocess.CompletedProcess:
    return dcmtk(
        "storescu", *options, "-aet", calling, "-aec", AE, "127.0.0.1", str(port), *map(str, files), timeout=timeout
    )


def echoscu(port: int, calling: str = "TESTSCU", options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return dcmtk("echoscu", *options, "-aet", calling, "-aec", AE, "127.0.0.1", str(port), timeout=30)


def img2dcm_fundus(directory: Path, study_uid: str, laterality: str, size: int = 128) -> Path:
    """A JPEG-baseline OP instance made by DCMTK img2dcm -oph from a JPEG written here."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg = directory / f"fundus_{laterality}.jpg"
    jpeg.write_bytes(jpeg_bytes(fundus_rgb(size, laterality)))
    out = directory / f"fundus_{laterality}.dcm"
    code = [
        "AcquisitionDeviceTypeCodeSequence[0]." + item
        for item in ("CodeValue=409898007", "CodingSchemeDesignator=SCT", "CodeMeaning=Fundus camera")
    ]
    keys = [f"StudyInstanceUID={study_uid}", f"ImageLaterality={laterality}", "PatientID=PHANTOM-1", *code]
    done = dcmtk("img2dcm", "-oph", *[arg for key in keys for arg in ("-k", key)], str(jpeg), str(out))
    assert done.returncode == 0, done.stderr
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def drain_jobs(settings: Settings, expect: int, timeout: float = 10) -> list[tuple[str, dict]]:
    """Take analyse jobs off the broker queue: [(task name, kwargs)]. Waits for `expect`, then for stragglers."""
    jobs: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    with Connection(settings.resolved_broker_url) as conn:
        queue = conn.SimpleQueue(settings.queue)
        while time.monotonic() < deadline:
            try:
                message = queue.get(timeout=0.5 if len(jobs) >= expect else 1.0)
            except Empty:
                if len(jobs) >= expect:
                    break
                continue
            _args, kwargs, _embed = message.payload
            jobs.append((message.headers["task"], kwargs))
            message.ack()
        queue.close()
    return jobs


def stored_files(settings: Settings) -> list[Path]:
    incoming = settings.data_dir / "incoming"
    return sorted(p for p in incoming.rglob("*") if p.is_file()) if incoming.is_dir() else []


def temp_files(settings: Settings) -> list[Path]:
    directory = settings.data_dir / "tmp"
    return sorted(directory.iterdir()) if directory.is_dir() else []


class StallingRelay:
    """A loopback TCP relay to a listener that stops forwarding client bytes after `limit` bytes.

    Lets a test catch a real transfer in the middle (e.g. to kill the listener) without timing luck.
    """

    def __init__(self, target_port: int, limit: int) -> None:
        self.target_port, self.limit = target_port, limit
        self.forwarded = 0
        self.error: OSError | None = None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        for source, sink, limited in ((client, upstream, True), (upstream, client, False)):
            thread = threading.Thread(target=self._pump, args=(source, sink, limited), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, limited: bool) -> None:
        try:
            while True:
                budget = self.limit - self.forwarded if limited else 1 << 16
                if budget <= 0:
                    time.sleep(0.05)  # hold the rest of the transfer
                    continue
                data = source.recv(min(budget, 1 << 16))
                if not data:
                    break
                sink.sendall(data)
                if limited:
                    self.forwarded += len(data)
        except OSError as exc:  # the other side went away (the test killed it): the relay's job is over
            self.error = exc
        finally:
            for sock in (source, sink):
                sock.close()

    def close(self) -> None:
        self.server.close()
