"""A job's one read of the index: the study snapshot (`read_study`) and each eye's candidates, which the
per-study job (`grok_pacs.jobs.study_job`) then takes without going back to the index. Each instance's
file is resolved once here (`StudySnapshot.files`), inside the data directory.

Selection (documented behaviour, tested):
- CFP: Ophthalmic Photography 8/16 bit (VL Photographic and Secondary Capture too when
  `accept_legacy_photography` is on); OCT: Ophthalmic Tomography. Other instances are ignored.
- Eye: ImageLaterality, else Laterality (the index records that). R and L are analysed; an instance with
  laterality B or none cannot be attributed to an eye and is skipped (noted in the study's detail).
- Several candidates: the newest AcquisitionDateTime wins (then the latest received). An instance whose
  header or pixels cannot be read is skipped, the next newest is used, and the skip is noted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from grok_pacs.analysis.result import Eye
from grok_pacs.config import Settings
from grok_pacs.dicom.sop_classes import LEGACY_SOP_CLASSES, OP_8BIT, OP_16BIT, OPT
from grok_pacs.dicom.uids import resolve_inside
from grok_pacs.store.index import InstanceRecord, StudyIndex, StudyState

CFP_SOP_CLASSES = (OP_8BIT, OP_16BIT)
OCT_SOP_CLASSES = (OPT,)


class Kind(StrEnum):
    CFP = "CFP"
    OCT = "OCT"


class StudyOutcome(StrEnum):
    ANALYSED = "analysed"  # SRs are in the outbox (new or rebuilt)
    ALREADY_DONE = "already-done"  # every SR of this key was delivered (or failed) before: nothing to do
    OUTDATED = "outdated"  # the study has a newer version (or is receiving again): this job is void
    UNKNOWN_STUDY = "unknown-study"
    BUSY = "busy"  # another job holds this version's claim (a duplicate job): it runs the model, not us


@dataclass
class EyeCandidates:
    """The usable instances of one eye, newest first."""

    eye: Eye
    cfp: list[InstanceRecord] = field(default_factory=list)
    oct: list[InstanceRecord] = field(default_factory=list)


def classify(rec: InstanceRecord, settings: Settings) -> Kind | None:
    """CFP, OCT, or None (not an input of the model)."""
    if rec.sop_class_uid in CFP_SOP_CLASSES:
        return Kind.CFP
    if settings.accept_legacy_photography and rec.sop_class_uid in LEGACY_SOP_CLASSES:
        return Kind.CFP
    if rec.sop_class_uid in OCT_SOP_CLASSES:
        return Kind.OCT
    return None


def _newest_first(rec: InstanceRecord) -> tuple[str, float, str]:
    """Sort key: acquisition date-time (DICOM DT sorts as text once the fraction is cut), then receipt."""
    return (rec.acquisition_datetime.split(".")[0].split("+")[0].split("-")[0], rec.received_at, rec.sop_uid)


def select_candidates(
    instances: list[InstanceRecord], settings: Settings
) -> tuple[dict[Eye, EyeCandidates], list[str]]:
    """Per eye, the CFP and OCT candidates newest first; plus notes on instances no eye can use."""
    eyes = {eye: EyeCandidates(eye) for eye in Eye}
    notes: list[str] = []
    for rec in sorted(instances, key=_newest_first, reverse=True):
        kind = classify(rec, settings)
        if kind is None:
            continue
        if rec.laterality not in (Eye.RIGHT.value, Eye.LEFT.value):
            notes.append(f"{kind.value} {rec.sop_uid} skipped: laterality {rec.laterality or 'missing'!s}")
            continue
        target = eyes[Eye(rec.laterality)]
        (target.cfp if kind is Kind.CFP else target.oct).append(rec)
    return eyes, notes


class StudyNotYetQueuedError(RuntimeError):
    """The job arrived before assembly recorded its version (it publishes first): try again shortly."""


@dataclass(frozen=True)
class StudySnapshot:
    """What a job knows of its study: one read of the index, handed down select -> analyse -> outbox.

    `void` says why the job has nothing to do (unknown study, newer version, receiving again); otherwise
    `eyes` holds each eye's candidates newest first and `notes` the instances no eye can use.
    """

    study_uid: str
    version: int
    void: StudyOutcome | None
    last_received_at: float | None = None  #: for the latency metrics
    instances: tuple[InstanceRecord, ...] = ()
    eyes: Mapping[Eye, EyeCandidates] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    files: Mapping[str, Path] = field(default_factory=dict)  #: SOP Instance UID -> its file, resolved once

    def holdings(self) -> str:
        """What the study holds (modality/laterality), for the reason of a study no eye can use."""
        return ", ".join(sorted({f"{i.modality}/{i.laterality or '-'}" for i in self.instances})) or "nothing"


def read_study(index: StudyIndex, settings: Settings, study_uid: str, version: int) -> StudySnapshot:
    """The job's one read of the index; raises StudyNotYetQueuedError when the job is ahead of assembly."""
    stored = index.read_study(study_uid)
    if stored is None:
        return StudySnapshot(study_uid, version, StudyOutcome.UNKNOWN_STUDY)
    study = stored.study
    if study.version < version:
        raise StudyNotYetQueuedError(f"study {study_uid} is at version {study.version}, the job at {version}")
    void = StudyOutcome.OUTDATED if study.version > version or study.state is StudyState.RECEIVING else None
    eyes, notes = select_candidates(list(stored.instances), settings)
    files = resolve_files(settings, stored.instances) if void is None else {}
    return StudySnapshot(study_uid, version, void, study.last_received_at, stored.instances, eyes, tuple(notes), files)


def resolve_files(settings: Settings, instances: Iterable[InstanceRecord]) -> dict[str, Path]:
    """Each instance's absolute file under the data directory (ValueError for a path that would leave it)."""
    data_dir = Path(settings.data_dir)
    return {rec.sop_uid: resolve_inside(data_dir, rec.path) for rec in instances}
