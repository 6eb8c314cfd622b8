"""DCMTK storescp as a destination PACS (delivery tests, e2e benchmark): every reception becomes its own file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from devtools.ports import wait_for_port
from devtools.tools import require_tool


class StoreSCP:
    """`storescp +uf` (unique file per C-STORE) on a loopback port, writing into `out_dir`."""

    def __init__(self, port: int, out_dir: Path, ae_title: str = "PACS", options: tuple[str, ...] = ()) -> None:
        self.port, self.out_dir, self.ae_title = port, Path(out_dir), ae_title
        self.options = options  # more storescp options, e.g. ("+tls", KEY, CERT, "+cf", CA)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        tool = require_tool("storescp")
        self.proc = subprocess.Popen(
            [tool, "-aet", self.ae_title, "+uf", *self.options, "-od", str(self.out_dir), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def received(self) -> list[pydicom.Dataset]:
        """Every dataset received so far (one per C-STORE, duplicates included)."""
        return [pydicom.dcmread(path) for path in sorted(self.out_dir.iterdir()) if path.is_file()]

    def received_srs(self) -> list[pydicom.Dataset]:
        return [ds for ds in self.received() if ds.Modality == "SR"]

    def received_pdfs(self) -> list[pydicom.Dataset]:
        """The Encapsulated PDF reports received (Modality DOC)."""
        return [ds for ds in self.received() if ds.Modality == "DOC"]

    def received_sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.received()]
