"""A cohort manifest from the clinicians' reviews: every reviewed eye of the results register becomes a
manifest row like `from-dicom` writes (docs/cohort-manifest.md), with the clinician's label.

The label is the clinician's: the corrected label, else the AI's label the clinician accepted (the
register keeps either as `reviewed_label`); a rejection without a label teaches nothing and is reported.
The images are the source CFP and OCT instances the result used (its `cfp_uid` / `oct_uid`), read where
grok-pacs keeps them: the data directory's file, else the object store (`storage_url`). From there on the
build is from-dicom's: the same header checks, foveal B-scan selection, pseudonyms (HMAC of the PatientID
under the salt kept outside OUT), split by subject, hard-linked images, and a report of every reviewed
result not used, with its reason. One row per eye: an eye reviewed at several visits keeps its latest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from grok_pacs.config import Settings
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.store.blobs import BlobIntegrityError, BlobNotFoundError
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.register import ResultRecord, ResultRegister, ResultState
from grok_pacs.store.storage import open_blob_store
from grok_pacs.store.uploads import Uploads
from training.cohort.from_dicom import (
    DESCRIPTION_NAME,
    BuildResult,
    Eye,
    NoUsableEyeError,
    _foveae,
    _records,
    _subject_labels,
    split_subjects,
)
from training.cohort.pairing import Pair
from training.cohort.pseudonym import load_or_create_salt, pseudonym
from training.cohort.report import REPORT_NAME, Unused, summary, write_report
from training.cohort.scan import Instance, classify
from training.cohort.tables import Keyed
from training.manifest import MANIFEST_NAME, load_manifest, write_manifest

FETCHED = ".fetched"  #: OUT's scratch folder for copies from the object store (removed at the end)


@dataclass(frozen=True)
class ReviewBuildSettings:
    runtime: Settings  #: grok-pacs' settings: data_dir, database_url, storage_url
    out_dir: Path
    salt_file: Path
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    copy: bool = False


@dataclass(frozen=True)
class Reviewed:
    """A reviewed result whose label and images are usable (identity in memory only, in `pair`)."""

    result: ResultRecord
    pair: Pair
    label: Label


class _Images:
    """The stored source instances of results: the index's file, else the object store's copy."""

    def __init__(self, settings: Settings, fetched: Path) -> None:
        self.settings, self.fetched = settings, fetched
        self.index = StudyIndex(settings.resolved_database_url)
        self.uploads = Uploads(self.index.engine) if settings.storage_url is not None else None
        self.store = open_blob_store(settings) if settings.storage_url is not None else None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.index.close()

    def instance(self, result: ResultRecord, sop_uid: str, kind: str) -> Instance | Unused:
        item = f"result {result.sr_uid}"
        if not sop_uid:
            return Unused("register", item, "unpaired", f"the result used no {kind}: nothing to pair")
        path = self._path(result.study_uid, sop_uid)
        if path is None:
            detail = f"its {kind} {sop_uid} is neither in the data directory nor in the object store"
            return Unused("register", item, "image gone", detail)
        root = self.fetched if self.fetched in path.parents else Path(self.settings.data_dir).resolve()
        found = classify(path, root)
        if isinstance(found, Unused):  # the same checks as an export's file, reported against the result
            return Unused("register", item, found.reason, f"its {kind} {sop_uid}: {found.detail}")
        return found

    def _path(self, study_uid: str, sop_uid: str) -> Path | None:
        record = next((r for r in self.index.instances(study_uid) if r.sop_uid == sop_uid), None)
        if record is None:
            return None
        local = (Path(self.settings.data_dir) / record.path).resolve()
        if local.is_file():
            return local
        key = self.uploads.key(sop_uid) if self.uploads is not None else None
        if key is None or self.store is None:
            return None
        try:
            return self.store.get(key, self.fetched).resolve()
        except (BlobNotFoundError, BlobIntegrityError):  # gone for good; an unreachable store stops the build
            return None


def reviewed_results(register: ResultRegister) -> list[ResultRecord]:
    """Every result a clinician reviewed (also those withdrawn afterwards), oldest first."""
    return [r for r in register.since(0.0) if r.review_outcome]


def clinician_label(result: ResultRecord) -> Label | Unused:
    """The label to train on, or why there is none."""
    item = f"result {result.sr_uid}"
    if result.state is ResultState.WITHDRAWN:
        return Unused("register", item, "withdrawn", f"withdrawn after review ({result.withdraw_reason})")
    if not result.reviewed_label:
        if result.review_outcome == "REJECTED":
            return Unused("register", item, "rejected", "rejected by the clinician without the right label")
        return Unused("register", item, "no label", "the result states no diagnosis and the clinician gave none")
    if result.reviewed_label not in {label.value for label in DIAGNOSTIC_LABELS}:
        detail = f"{result.reviewed_label!r} is not a diagnostic label (Indeterminate is never a training label)"
        return Unused("register", item, "unknown label", detail)
    return Label(result.reviewed_label)


def _usable(results: list[ResultRecord], images: _Images) -> tuple[list[Reviewed], list[Unused]]:
    kept: list[Reviewed] = []
    unused: list[Unused] = []
    for result in results:
        label = clinician_label(result)
        if isinstance(label, Unused):
            unused.append(label)
            continue
        cfp = images.instance(result, result.cfp_uid, "CFP")
        if isinstance(cfp, Unused):
            unused.append(cfp)
            continue
        oct_ = images.instance(result, result.oct_uid, "OCT")
        if isinstance(oct_, Unused):
            unused.append(oct_)
            continue
        kept.append(Reviewed(result, Pair(cfp.patient_id, result.eye, cfp, oct_), label))
    kept, earlier = _latest_per_eye(kept)
    return kept, unused + earlier


def _latest_per_eye(kept: list[Reviewed]) -> tuple[list[Reviewed], list[Unused]]:
    """One row per patient and eye: the latest reviewed result (the manifest holds an eye once)."""
    latest: dict[tuple[str, str], Reviewed] = {}
    unused = []
    for reviewed in sorted(kept, key=lambda r: (r.result.reviewed_at or 0.0, r.result.sr_uid)):
        key = (reviewed.pair.patient_id, reviewed.pair.eye)
        if key in latest:
            earlier = latest[key].result.sr_uid
            unused.append(Unused("register", f"result {earlier}", "extra visit", "a later review of the same eye"))
        latest[key] = reviewed
    return list(latest.values()), unused


def build_from_reviews(s: ReviewBuildSettings) -> BuildResult:
    """OUT/manifest.csv, OUT/cohort-report.json and OUT/cohort.json from the reviewed results; raises
    NoUsableEyeError (with the report written) when no reviewed eye can be used."""
    out = s.out_dir.resolve()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"the output folder {out} is not empty: give a new one (old images would be mixed in)")
    salt = load_or_create_salt(s.salt_file, out)
    register = ResultRegister(s.runtime.resolved_database_url)
    images = _Images(s.runtime, out / FETCHED)
    try:
        results = reviewed_results(register)
        kept, unused = _usable(results, images)
        eyes, more = _foveae([Eye(r.pair, r.label, -1, "") for r in kept])
        unused += _against_results(more, kept)
        out.mkdir(parents=True, exist_ok=True)
        if not eyes:
            report = write_report(out / REPORT_NAME, unused, {"reviewed_results": len(results), "eyes": 0})
            raise NoUsableEyeError(f"no usable reviewed eye ({summary(unused)}); see {report}", unused)
        return _write(s, out, salt, eyes, kept, unused, len(results))
    finally:
        images.close()
        register.close()
        shutil.rmtree(out / FETCHED, ignore_errors=True)  # the linked images keep their own copy


def _against_results(unused: list[Unused], kept: list[Reviewed]) -> list[Unused]:
    """`_foveae` names files: name the result instead (a file under the data dir names no patient either)."""
    by_rel = {r.pair.oct.rel: r.result.sr_uid for r in kept} | {r.pair.cfp.rel: r.result.sr_uid for r in kept}
    return [dataclasses.replace(u, source="register", item=f"result {by_rel.get(u.item, u.item)}") for u in unused]


def _write(
    s: ReviewBuildSettings,
    out: Path,
    salt: bytes,
    eyes: list[Eye],
    kept: list[Reviewed],
    unused: list[Unused],
    n_results: int,
) -> BuildResult:
    subjects = {e.pair.patient_id: pseudonym(salt, e.pair.patient_id) for e in eyes}
    splits = split_subjects(_subject_labels(eyes, subjects), s.seed, s.val_fraction, s.test_fraction)
    records, linked = _records(eyes, subjects, splits, Keyed(), out, s.copy)
    review_of = {(r.pair.patient_id, r.pair.eye): r.result for r in kept}
    pseudonyms = {subject: patient for patient, subject in subjects.items()}
    records = [
        dataclasses.replace(r, meta={**r.meta, **_review_meta(review_of[(pseudonyms[r.subject_id], r.eye)])})
        for r in records
    ]
    manifest = write_manifest(out / MANIFEST_NAME, records)
    load_manifest(manifest)  # the stages' own check: a manifest they would refuse is never handed over
    counts = {
        "reviewed_results": n_results,
        "subjects": len(subjects),
        "eyes": len(records),
        "eyes_per_label": dict(sorted(Counter(r.label.value for r in records).items())),
        "eyes_per_split": dict(sorted(Counter(r.split for r in records).items())),
        "eyes_per_review": dict(sorted(Counter(r.meta["review"] for r in records).items())),
        "fovea_found": sum(1 for r in records if r.fovea_frame is not None),
        "images": dict(linked),
    }
    report = write_report(out / REPORT_NAME, unused, counts)
    description = {
        "synthetic": False,
        "generator": "training.cohort from-reviews",
        "labels": "the clinician's: the corrected label, else the accepted AI label",
        "seed": s.seed,
        "split_fractions": {"val": s.val_fraction, "test": s.test_fraction},
        "pseudonyms": "S + first 16 hex of HMAC-SHA256(salt, PatientID); the salt is not in this folder",
        "counts": counts,
    }
    (out / DESCRIPTION_NAME).write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")
    return BuildResult(manifest, report, unused, counts)


def _review_meta(result: ResultRecord) -> dict[str, str]:
    """What the team may want to slice by: the outcome, the AI's own label and the bundle that stated it."""
    return {
        "review": result.review_outcome.lower(),
        "ai_label": result.label or "ungradable",
        "bundle_version": result.bundle_version,
    }
