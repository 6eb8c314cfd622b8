"""DICOM UID validation and the only way a received instance's path is built.

Study, Series and SOP Instance UIDs arrive from the network and become directory and file names, so
they are checked against the DICOM UID grammar (PS3.5 §9.1: dot-separated numeric components, no
leading zeros, at most 64 characters) before any path is built: `1.2.3/../../x` can never name a file.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

MAX_UID_LENGTH = 64
INCOMING_DIR = "incoming"
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


class InvalidUIDError(ValueError):
    """A value that is not a DICOM UID where one is required; the message names the attribute."""


def is_valid_uid(value: object) -> bool:
    """True when `value` is a string that follows the DICOM UID grammar."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID_RE.fullmatch(value) is not None


def require_uid(value: object, name: str) -> str:
    """Return `value` if it is a valid UID, else raise InvalidUIDError naming the attribute."""
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidUIDError(f"{name} {shown} is not a valid DICOM UID")
    return str(value)


def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> PurePosixPath:
    """`incoming/<study>/<series>/<sop>.dcm`, relative to the data directory, from validated UIDs."""
    study = require_uid(study_uid, "StudyInstanceUID")
    series = require_uid(series_uid, "SeriesInstanceUID")
    sop = require_uid(sop_uid, "SOPInstanceUID")
    return PurePosixPath(INCOMING_DIR, study, series, f"{sop}.dcm")


def resolve_inside(data_dir: Path, relpath: PurePosixPath | str) -> Path:
    """The absolute path of `relpath` under `data_dir`; raises ValueError if it would leave it."""
    root = Path(data_dir).resolve()
    target = (root / Path(relpath)).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"path {relpath!s} leaves the data directory {root}")
    return target


def uids_from_relpath(relpath: PurePosixPath) -> tuple[str, str, str] | None:
    """(study, series, sop) when `relpath` is a well-formed `incoming/...` instance path, else None."""
    parts = relpath.parts
    if len(parts) != 4 or parts[0] != INCOMING_DIR or not parts[3].endswith(".dcm"):
        return None
    study, series, sop = parts[1], parts[2], parts[3][: -len(".dcm")]
    if not all(is_valid_uid(uid) for uid in (study, series, sop)):
        return None
    return study, series, sop
