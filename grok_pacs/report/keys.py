"""Idempotency keys of the result instances grok-pacs writes into a study, and the UIDs derived from them.

One SR per (study, study version, bundle version, eye) and one PDF report per (study, study version,
bundle version): the same key always gives the same SOP Instance UID on any machine, so a re-run rebuilds
the same instance and the outbox delivers it once. Each result sits in its own series (SeriesNumber
below), because viewers such as OHIF open only the last instance of an SR series.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from grok_pacs.analysis.result import Eye

_UID_NAMESPACE = "grok-pacs/sr/v1"  # part of every derived UID: never change it (UIDs would change)
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:grok-pacs:sr:v1")

PDF_SERIES_NUMBER = 9100
SR_SERIES_NUMBERS = {Eye.RIGHT: 9101, Eye.LEFT: 9102}


def derived_uid(*parts: str) -> str:
    """A DICOM UID under 2.25 (PS3.5 B.2) from a name-based UUID: same parts, same UID, any machine."""
    return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, chr(31).join(parts)).int}"


class _DerivedUIDs:
    """The instance and series UIDs of a key, derived from its `_parts()`."""

    def _parts(self) -> list[str]:
        raise NotImplementedError

    @property
    def sop_instance_uid(self) -> str:
        return derived_uid(*self._parts())

    @property
    def series_uid(self) -> str:
        """One series per result: OHIF shows one SR per series, so eyes (and the PDF) must not share one."""
        return derived_uid(*self._parts(), "series")


@dataclass(frozen=True)
class SRKey(_DerivedUIDs):
    """The idempotency key of one eye's SR: the same key always gives the same SOP Instance UID."""

    study_uid: str
    study_version: int
    bundle_version: str
    eye: Eye

    def _parts(self) -> list[str]:
        return [_UID_NAMESPACE, self.study_uid, str(self.study_version), self.bundle_version, self.eye.value]

    @property
    def series_number(self) -> int:
        return SR_SERIES_NUMBERS[self.eye]

    @property
    def instance_number(self) -> int:
        return 1

    def __str__(self) -> str:
        return f"{self.study_uid} v{self.study_version} bundle {self.bundle_version} eye {self.eye.value}"


@dataclass(frozen=True)
class ReportKey(_DerivedUIDs):
    """The idempotency key of the study's PDF report: the SR key without the eye (one PDF per study run)."""

    study_uid: str
    study_version: int
    bundle_version: str

    def _parts(self) -> list[str]:
        return [_UID_NAMESPACE, self.study_uid, str(self.study_version), self.bundle_version, "pdf"]

    @property
    def series_number(self) -> int:
        return PDF_SERIES_NUMBER

    def __str__(self) -> str:
        return f"{self.study_uid} v{self.study_version} bundle {self.bundle_version} PDF report"
