"""The S3-compatible blob store backend (AWS S3, MinIO, Ceph RGW, SeaweedFS) through boto3.

Writes are conditional (`If-None-Match: *`: a key that exists is never replaced; its 412 is success
when the stored size matches) and carry the key's sha256 as `x-amz-checksum-sha256`, so the server
refuses bytes that do not hash to their key. Reads stream into the caller's scratch directory and are
checked against the key (grok_pacs.store.blobs.write_verified). A 200 is not proof of durability on
every server (SeaweedFS does not fsync by default): callers keep their local copy until the upload is
recorded.
"""

from __future__ import annotations

import base64
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from grok_pacs.config import StorageUrl
from grok_pacs.store.blobs import (
    BlobError,
    BlobIntegrityError,
    BlobKey,
    BlobNotFoundError,
    BlobStore,
    BlobStoreUnavailable,
    read_chunks,
    write_verified,
)

MAX_ATTEMPTS = 3  # botocore "standard" retries: connection errors, throttling, 5xx
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_EXISTS = {"412", "PreconditionFailed"}
_BAD_DIGEST = {"BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"}


class S3BlobStore(BlobStore):
    """Objects under `s3://bucket/prefix/<key>`; endpoint and credentials explicit or boto3's defaults."""

    def __init__(
        self,
        location: StorageUrl,
        *,
        endpoint: str = "",
        region: str = "",
        access_key: str = "",
        secret_key: str = "",
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(location, StorageUrl):
            raise TypeError(f"location must be a StorageUrl, not {type(location).__name__}")
        if bool(access_key) != bool(secret_key):
            raise ValueError("access_key and secret_key must be given together")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.location = location
        self.endpoint = endpoint
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
            s3={"addressing_style": "path"} if endpoint else {},
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            region_name=region or None,
        )
        self._client = session.client("s3", endpoint_url=endpoint or None, config=config)

    def __repr__(self) -> str:
        return f"S3BlobStore({self.location} at {self.endpoint or 'the AWS default endpoint'})"

    def _name(self, key: BlobKey) -> str:
        return f"{self.location.prefix}/{key}" if self.location.prefix else str(key)

    def _error(self, exc: Exception, action: str, key: BlobKey | None = None) -> BlobError:
        """The typed error for a boto3 failure (its message names the store, the action and the key)."""
        what = f"{self!r}: {action}{f' {key}' if key else ''} failed"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                return BlobNotFoundError(f"{what}: no such object")
            if code in _BAD_DIGEST:
                return BlobIntegrityError(f"{what}: the store received bytes that do not hash to the key")
            return BlobStoreUnavailable(f"{what}: {code or 'error'} {exc}")
        return BlobStoreUnavailable(f"{what}: the store is unreachable ({type(exc).__name__}: {exc})")

    def put(self, key: BlobKey, source: Path, *, replace: bool = False) -> bool:
        checksum = base64.b64encode(bytes.fromhex(key.sha256)).decode()
        size = Path(source).stat().st_size
        condition = {} if replace else {"IfNoneMatch": "*"}  # replace: over a corrupt object of the same key
        try:
            with open(source, "rb") as body:
                self._client.put_object(
                    Bucket=self.location.bucket,
                    Key=self._name(key),
                    Body=body,
                    ContentLength=size,
                    ChecksumSHA256=checksum,
                    **condition,
                )
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in _EXISTS:
                raise self._error(exc, "put", key) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "put", key) from exc
        return self._existing_matches(key, size)

    def _existing_matches(self, key: BlobKey, size: int) -> bool:
        """After a 412: the key exists. Its name is its hash, so equal sizes mean the same object."""
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=self._name(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "head", key) from exc
        if head["ContentLength"] != size:
            raise BlobIntegrityError(
                f"{self!r}: existing object {key} has the wrong size ({head['ContentLength']} bytes, not {size})"
            )
        return False

    def get(self, key: BlobKey, scratch_dir: Path) -> Path:
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=self._name(key))
            with response["Body"] as body:
                return write_verified(key, read_chunks(body), scratch_dir, repr(self))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "get", key) from exc

    def exists(self, key: BlobKey) -> bool:
        try:
            self._client.head_object(Bucket=self.location.bucket, Key=self._name(key))
            return True
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, "head", key)
            if isinstance(error, BlobNotFoundError):
                return False
            raise error from exc

    def delete(self, key: BlobKey) -> int:
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=self._name(key))
            self._client.delete_object(Bucket=self.location.bucket, Key=self._name(key))
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, "delete", key)
            if isinstance(error, BlobNotFoundError):
                return 0
            raise error from exc
        return int(head["ContentLength"])

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.location.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise BlobStoreUnavailable(f"{self!r}: bucket {self.location.bucket} does not answer: {exc}") from exc

    def close(self) -> None:
        self._client.close()
