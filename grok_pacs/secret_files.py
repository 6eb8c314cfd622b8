"""Secrets from files: `GROK_PACS_<NAME>_FILE=/run/secrets/x` sets `<name>` to that file's content.

The way Docker and Kubernetes hand secrets to a process without putting them in its environment (which
`ps e`, `docker inspect` and crash reports show). A pydantic-settings source, ranked just below the plain
environment variable; setting both is refused, since which one wins would be a guess.

May import: nothing else from grok_pacs (config imports it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

ENV_PREFIX = "GROK_PACS_"
# Settings that may carry credentials (URLs with passwords, keys, tokens).
SECRET_FIELDS = (
    "database_url",
    "broker_url",
    "storage_access_key",
    "storage_secret_key",
    "metrics_token",
    "review_secret_key",
)


class SecretFileError(ValueError):
    """A *_FILE variable that cannot be used; the message names the variable, never the content."""


def file_variable(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}_FILE"


def read_secret_file(variable: str, path: str) -> str:
    """The file's content without surrounding whitespace (editors and `echo` add a final newline)."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SecretFileError(f"{variable}: cannot read {path}: {reason}") from None
    if not value:
        raise SecretFileError(f"{variable}: {path} is empty")
    return value


def secrets_from_files(environ: os._Environ[str] | dict[str, str] = os.environ) -> dict[str, str]:
    """{setting: value} for every GROK_PACS_<NAME>_FILE set in `environ`."""
    values: dict[str, str] = {}
    for name in SECRET_FIELDS:
        variable = file_variable(name)
        path = environ.get(variable)
        if not path:
            continue
        if f"{ENV_PREFIX}{name.upper()}" in environ:
            raise SecretFileError(f"{variable} and {ENV_PREFIX}{name.upper()} are both set: set one")
        values[name] = read_secret_file(variable, path)
    return values


class SecretFileSource(PydanticBaseSettingsSource):
    """pydantic-settings source for the *_FILE variables."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        return secrets_from_files()
