"""Subject pseudonyms: HMAC-SHA256 of the PatientID under a secret salt kept outside the cohort.

The same salt gives the same pseudonym to a patient in every export built with it (so later exports can
be merged and split consistently); without the salt a pseudonym cannot be linked back to a PatientID by
hashing candidate IDs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SALT_FILE = Path("~/.config/grok-pacs/cohort-salt")
SALT_BYTES = 32
PSEUDONYM_HEX = 16  #: 64 bits: collisions are negligible for any hospital's patient count


class SaltError(ValueError):
    """The salt file is unusable (inside the output, empty)."""


def load_or_create_salt(path: Path, out_dir: Path) -> bytes:
    """The salt in `path`, created (random, mode 0600) when absent; refused inside `out_dir`."""
    path = path.expanduser().resolve()
    out = out_dir.resolve()
    if path == out or out in path.parents:
        raise SaltError(f"the salt file {path} must be outside the output folder {out} (it must never ship with it)")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(SALT_BYTES) + "\n")
        log.warning(
            "created a new pseudonymisation salt in %s: keep it (and keep it secret) to give the same "
            "pseudonyms to the next export",
            path,
        )
    salt = path.read_text(encoding="utf-8").strip().encode()
    if not salt:
        raise SaltError(f"the salt file {path} is empty")
    return salt


def pseudonym(salt: bytes, patient_id: str) -> str:
    """`S` + the first 16 hex digits of HMAC-SHA256(salt, PatientID)."""
    return "S" + hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]
