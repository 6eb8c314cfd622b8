"""The blob store, local files and a real S3 server (SeaweedFS): what a worker reading an instance back
would notice. Both backends pass the same tests."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from devtools.ports import free_port
from grok_pacs.config import StorageUrl, load_settings
from grok_pacs.store.blobs import (
    BlobIntegrityError,
    BlobKey,
    BlobNotFoundError,
    BlobStore,
    BlobStoreUnavailable,
    LocalBlobStore,
    sha256_file,
)
from grok_pacs.store.s3 import S3BlobStore
from grok_pacs.store.storage import open_blob_store

STUDY = "1.2.826.0.1.3680043.8.498.1"
_prefixes = itertools.count()


def _s3_store(seaweedfs, endpoint: str | None = None) -> S3BlobStore:
    from devtools.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

    settings = load_settings(
        storage_url=f"s3://{BUCKET}/test-{os.getpid()}-{next(_prefixes)}",
        storage_endpoint=endpoint or seaweedfs.endpoint,
        storage_access_key=ACCESS_KEY,
        storage_secret_key=SECRET_KEY,
        storage_timeout=2,
    )
    store = open_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    return store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        blob_store = open_blob_store(load_settings(data_dir=tmp_path / "data"))
        assert isinstance(blob_store, LocalBlobStore)
    else:
        blob_store = _s3_store(request.getfixturevalue("seaweedfs"))
    yield blob_store
    blob_store.close()


def _instance(tmp_path: Path, sop: str, payload: bytes) -> tuple[BlobKey, Path]:
    source = tmp_path / f"{sop}.dcm"
    source.write_bytes(payload)
    return BlobKey.for_file("instances", STUDY, sop, source), source


def _overwrite_out_of_band(store: BlobStore, key: BlobKey, payload: bytes, request: pytest.FixtureRequest) -> None:
    """Replace the stored bytes behind the store's back (bit rot, an operator, another tool)."""
    if isinstance(store, LocalBlobStore):
        (store.root / key.path).write_bytes(payload)
    else:
        name = f"{store.location.prefix}/{key}"
        request.getfixturevalue("seaweedfs").client().put_object(Bucket=store.location.bucket, Key=name, Body=payload)


def test_round_trip_gives_the_same_bytes_under_the_content_named_key(store: BlobStore, tmp_path: Path) -> None:
    payload = os.urandom(3 << 20) + b"end"  # over one 1 MiB read chunk
    key, source = _instance(tmp_path, "1.2.3.4", payload)
    assert str(key) == f"instances/{STUDY}/1.2.3.4.{sha256_file(source)}.dcm"
    assert not store.exists(key)
    assert store.put(key, source) is True
    assert store.exists(key)
    scratch = tmp_path / "scratch"
    copy = store.get(key, scratch)
    assert copy == scratch / key.path
    assert copy.read_bytes() == payload
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # no temporary file left


def test_a_second_put_of_the_same_key_is_success_and_never_replaces(store: BlobStore, tmp_path: Path) -> None:
    key, source = _instance(tmp_path, "1.2.3.5", b"first bytes")
    assert store.put(key, source) is True
    assert store.put(key, source) is False  # already there: same name, same bytes
    assert store.get(key, tmp_path / "scratch").read_bytes() == b"first bytes"


def test_bytes_that_do_not_hash_to_their_key_are_refused_on_put(store: BlobStore, tmp_path: Path) -> None:
    key, source = _instance(tmp_path, "1.2.3.6", b"original")
    source.write_bytes(b"changed after the key was made")
    with pytest.raises(BlobIntegrityError):
        store.put(key, source)
    assert not store.exists(key)


def test_the_conditional_put_keeps_the_stored_object(
    store: BlobStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A put onto an existing key never replaces it: an object corrupted to another size is reported, not
    silently overwritten (the store's copy is the evidence an administrator needs)."""
    key, source = _instance(tmp_path, "1.2.3.7", b"the real instance")
    store.put(key, source)
    _overwrite_out_of_band(store, key, b"short", request)
    with pytest.raises(BlobIntegrityError, match="wrong size"):
        store.put(key, source)
    with pytest.raises(BlobIntegrityError):
        store.get(key, tmp_path / "scratch")


def test_a_corrupted_object_is_refused_on_read_and_leaves_nothing(
    store: BlobStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    key, source = _instance(tmp_path, "1.2.3.8", b"A" * 4096)
    store.put(key, source)
    _overwrite_out_of_band(store, key, b"B" * 4096, request)  # same size: only the hash tells
    scratch = tmp_path / "scratch"
    with pytest.raises(BlobIntegrityError, match="refused"):
        store.get(key, scratch)
    assert [p for p in scratch.rglob("*") if p.is_file()] == []


def test_a_missing_object_is_a_typed_error(store: BlobStore, tmp_path: Path) -> None:
    key = BlobKey("instances", STUDY, "1.2.3.9", "0" * 64)
    assert not store.exists(key)
    with pytest.raises(BlobNotFoundError):
        store.get(key, tmp_path / "scratch")


def _store_down(store: BlobStore, request: pytest.FixtureRequest) -> BlobStore:
    if isinstance(store, LocalBlobStore):
        store.root.rename(store.root.with_name("blobs-unmounted"))
        return store
    return _s3_store(request.getfixturevalue("seaweedfs"), endpoint=f"http://127.0.0.1:{free_port()}")


def test_store_down_is_a_clear_error_for_every_operation(
    store: BlobStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    key, source = _instance(tmp_path, "1.2.3.10", b"payload")
    down = _store_down(store, request)
    for operation in (lambda: down.put(key, source), lambda: down.get(key, tmp_path / "s"), lambda: down.exists(key)):
        with pytest.raises(BlobStoreUnavailable, match="LocalBlobStore|unreachable"):
            operation()
    with pytest.raises(BlobStoreUnavailable):
        down.check()
    assert source.read_bytes() == b"payload"  # the caller's copy is untouched


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("instances/1.2/1.3.abc.dcm", "not a blob key"),
        ("instances/../1.3." + "a" * 64 + ".dcm", "not a valid DICOM UID"),
        ("outbox/1.2/1.3." + "a" * 64 + ".dcm", "not a blob key"),
        ("instances/1.02/1.3." + "a" * 64 + ".dcm", "not a valid DICOM UID"),
    ],
)
def test_a_bad_key_fails_loudly(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        BlobKey.parse(text)


def test_keys_read_back_from_the_database_are_the_same_key() -> None:
    key = BlobKey("results", STUDY, "2.25.1", "f" * 64)
    assert BlobKey.parse(str(key)) == key


@pytest.mark.parametrize("url", ["http://bucket/x", "s3://Bad_Bucket", "s3://ok-bucket/a//b", "s3://ok-bucket/../x"])
def test_a_bad_storage_url_fails_at_start(url: str) -> None:
    with pytest.raises(ValueError):
        StorageUrl.parse(url)
