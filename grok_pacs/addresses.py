"""Network addresses written as text in settings and on the command line: a DICOM peer (`AE@HOST:PORT`,
`Peer`) and an S3-compatible store (`s3://BUCKET[/PREFIX]`, `StorageUrl`), each parsed and checked once.
`grok_pacs.config` types its settings with them (import them from there or from here: the same classes).

May import: nothing else from grok_pacs (config imports it).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: 16 chars, no backslash


def check_ae_title(value: str, setting: str) -> str:
    """`value` stripped when it is a valid AE title, else ValueError naming `setting`."""
    value = value.strip()
    if not AE_TITLE_RE.match(value):
        raise ValueError(f"{setting}: {value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value


class Peer(BaseModel):
    """A remote DICOM node: `AE@HOST:PORT` in environment variables and on the command line."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "ae_title")

    @classmethod
    def parse(cls, text: str) -> Peer:
        match = re.fullmatch(r"\s*([^@]+)@([^:@\s]+):(\d+)\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not AE@HOST:PORT")
        return cls(ae_title=match[1], host=match[2], port=int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


# S3 bucket names (AWS rules, which MinIO, Ceph RGW and SeaweedFS accept): 3-63 of a-z 0-9 . -, alphanumeric ends.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")  # no '.', '..' or empty segment


class StorageUrl(BaseModel):
    """Where instances and results go on an S3-compatible store: `s3://BUCKET[/PREFIX]`."""

    bucket: str
    prefix: str = ""  # key prefix without leading or trailing '/', e.g. 'site-a/grok'

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET_RE.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not all(_PREFIX_SEGMENT_RE.match(part) for part in value.split("/")):
            raise ValueError(f"key prefix {value!r} may hold only A-Z a-z 0-9 . _ - between single '/'")
        return value

    @classmethod
    def parse(cls, text: str) -> StorageUrl:
        match = re.fullmatch(r"s3://([^/]*)(?:/(.*?))?/?", text.strip())
        if not match:
            raise ValueError(f"{text!r} is not s3://BUCKET[/PREFIX]")
        return cls(bucket=match[1], prefix=match[2] or "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
