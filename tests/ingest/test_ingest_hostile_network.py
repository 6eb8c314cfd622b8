"""The listener against hostile peers on raw sockets: declared PDU lengths, drips, half-open connections.

Each test runs with the fast path and with pynetdicom as released (`fast_path` fixture); a real PACS
association (DCMTK echoscu / storescu) must keep working while the hostile connections are held.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from devtools.sample_dicom import fundus_photograph, write
from grok_pacs.config import Peer
from grok_pacs.dicom import fastpath
from grok_pacs.dicom.scu import TransientStoreError, store_dataset
from grok_pacs.ingest import guard
from tests.helpers.ingest_support import AE as OUR_AE
from tests.helpers.ingest_support import (
    echoscu,
    ingest_settings,
    running,
    stored_files,
    storescu,
    temp_files,
    wait_until,
)

GIB = 1 << 30
A_ABORT = 0x07


def _rss_bytes() -> int:
    """This process's resident set (the listener runs in it), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the listener sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _echo_association(port: int):
    scu = AE(ae_title="HOSTILE")
    scu.add_requested_context("1.2.840.10008.1.1")
    assoc = scu.associate("127.0.0.1", port, ae_title=OUR_AE)
    assert assoc.is_established
    return assoc


def test_declared_pdu_lengths_never_drive_memory(tmp_path: Path, fast_path: bool, caplog, monkeypatch) -> None:
    """16 connections declaring 1 GiB association requests, and a P-DATA over max_pdu inside an association:
    each gets an A-ABORT and is closed at once, the listener's memory does not grow with what they declare."""
    monkeypatch.setattr(guard.DROPS, "burst", 1000)  # every line, whatever earlier tests dropped
    settings = ingest_settings(tmp_path, pynetdicom_fast_path=fast_path, max_pdu=65536)
    with running(settings) as service:
        assert echoscu(service.port).returncode == 0  # warm: threads, imports
        before = _rss_bytes()
        hostile = [_connect(service.port) for _ in range(16)]
        for sock in hostile:
            sock.sendall(struct.pack(">BBL", 0x01, 0, GIB))
        answers = [_answer(sock) for sock in hostile]
        assoc = _echo_association(service.port)
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBL", 0x04, 0, settings.max_pdu + 1) + b"\0" * 4096)
        wait_until(lambda: assoc.is_aborted, 10, "the association aborted by the listener")
        grown = _rss_bytes() - before
        assert echoscu(service.port).returncode == 0  # real associations still work
    assert all(a[:1] == bytes([A_ABORT]) and len(a) == 10 for a in answers), answers[:2]
    assert grown < 64 << 20, f"listener grew by {grown >> 20} MiB"
    refusals = [r.getMessage() for r in caplog.records if "over the limit" in r.getMessage()]
    assert len(refusals) == 17 and all("127.0.0.1:" in line for line in refusals)
    assert any(f"declares {settings.max_pdu + 1} bytes" in line for line in refusals)


def test_a_pdu_dripped_byte_by_byte_is_cut_at_its_deadline(tmp_path: Path, fast_path: bool) -> None:
    settings = ingest_settings(
        tmp_path, pynetdicom_fast_path=fast_path, acse_timeout=1.5, network_timeout=1.5, dimse_timeout=5
    )
    with running(settings) as service:
        assoc = _echo_association(service.port)
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBL", 0x04, 0, 64))  # a P-DATA announced, then one byte every 0.25 s
        started = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(40):
                raw.sendall(b"\0")
                time.sleep(0.25)
        assert time.monotonic() - started < 6  # cut after about network_timeout, not after 40 drips
        assert echoscu(service.port).returncode == 0


def test_connections_that_never_associate_are_closed_and_never_starve_a_pacs(tmp_path: Path, fast_path: bool) -> None:
    """200 idle connections and 8 drippers held open: only `max_pending_connections` of them wait at a time
    (oldest closed first), each at most acse_timeout; the PACS's associations all succeed meanwhile."""
    settings = ingest_settings(
        tmp_path, pynetdicom_fast_path=fast_path, max_pending_connections=32, max_associations=4, acse_timeout=3
    )
    photo = write(fundus_photograph(generate_uid(), "R", size=32), tmp_path / "photo.dcm")
    with running(settings) as service:
        idle = [_connect(service.port) for _ in range(200)]
        drippers = [_connect(service.port) for _ in range(8)]
        for sock in drippers:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 68))
        results = [echoscu(service.port).returncode for _ in range(5)]
        results.append(storescu(service.port, photo, options=("-xy",)).returncode)
        closed = _closed_by_peer(idle)
        # the drippers: the whole association request must arrive within acse_timeout
        wait_until(lambda: len(_closed_by_peer(drippers)) == len(drippers), 10, "drippers closed", step=0.2)
        for sock in idle + drippers:
            sock.close()
    assert results == [0] * 6
    assert len(closed) >= 200 - 32
    assert len(stored_files(settings)) == 1 and temp_files(settings) == []


def _closed_by_peer(sockets: list[socket.socket]) -> set[socket.socket]:
    """The sockets whose connection the listener closed (end of stream or reset), without blocking."""
    readable, _, _ = select.select(sockets, [], [], 0.2)
    closed = set()
    for sock in readable:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                closed.add(sock)
        except OSError:  # reset
            closed.add(sock)
    return closed


def test_a_flood_of_dropped_connections_does_not_flood_the_log(caplog) -> None:
    drops = guard.DropLog(burst=3, window=0.2)
    for number in range(5):
        drops.warning("closing connection from %s: test", f"10.0.0.{number}")
    time.sleep(0.25)
    drops.warning("closing connection from %s: test", "10.0.0.9")
    lines = [r.getMessage() for r in caplog.records if r.name == "grok_pacs.ingest.guard"]
    assert lines[:3] == [f"closing connection from 10.0.0.{n}: test" for n in range(3)]
    assert lines[3:] == ["closing connection from 10.0.0.9: test (2 more dropped connections not logged)"]


def test_a_hostile_pacs_cannot_make_the_result_sender_allocate_what_it_declares(fast_path: bool) -> None:
    """The SR sender's side: a 'PACS' that answers the association request with a PDU declaring 1 GiB, then
    stalls. The sender reads into a buffer that grows with what arrives, and gives up at its deadline."""
    was_installed = fastpath.installed()
    fastpath.install() if fast_path else fastpath.uninstall()
    try:
        _send_to_a_hostile_pacs()
    finally:
        fastpath.install() if was_installed else fastpath.uninstall()


def _send_to_a_hostile_pacs() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def hostile_pacs() -> None:
        client, _ = server.accept()
        client.recv(65536)  # the A-ASSOCIATE-RQ
        client.sendall(struct.pack(">BBL", 0x02, 0, GIB) + b"\0" * 65536)
        time.sleep(6)
        client.close()

    thread = threading.Thread(target=hostile_pacs, daemon=True)
    thread.start()
    before = _rss_bytes()
    pacs = Peer(ae_title="PACS", host="127.0.0.1", port=port)
    with pytest.raises(TransientStoreError):
        store_dataset(pacs, fundus_photograph(generate_uid(), "R", size=32), calling_ae="GROK_PACS", timeout=3)
    grown = _rss_bytes() - before
    thread.join(timeout=10)
    server.close()
    assert grown < 64 << 20, f"the sender grew by {grown >> 20} MiB"
