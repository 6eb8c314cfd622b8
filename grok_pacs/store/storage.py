"""Which blob store the settings select: `storage_url` empty = files under the data directory (one box),
`s3://bucket/prefix` = an S3-compatible store at `storage_endpoint` with the storage credentials (or
boto3's own: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws)."""

from __future__ import annotations

from grok_pacs.config import Settings
from grok_pacs.store.blobs import BlobStore, LocalBlobStore
from grok_pacs.store.s3 import S3BlobStore


def open_blob_store(settings: Settings) -> BlobStore:
    """The configured store; the caller closes it."""
    if settings.storage_url is None:
        return LocalBlobStore(settings.data_dir)
    return S3BlobStore(
        settings.storage_url,
        endpoint=settings.storage_endpoint,
        region=settings.storage_region,
        access_key=settings.storage_access_key,
        secret_key=settings.storage_secret_key.get_secret_value(),
        timeout=settings.storage_timeout,
    )
