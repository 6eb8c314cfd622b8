"""A cohort manifest from a PACS export: headers, pairs, labels, measurements, pseudonyms, split, report.

The images are hard-linked (copied where a link is impossible, as across file systems) into
`OUT/images/<pseudonym>/<eye>/{cfp,oct}.dcm`, so the manifest's paths name no patient even when the
export's folders do, and the cohort survives the export being moved. The DICOM files keep their own
headers: the cohort folder holds identifiable images and must be kept like the export. What the manifest
and the report hold is pseudonymous: the subject is HMAC-SHA256(salt, PatientID), no date is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grok_pacs.analysis.imaging import ImageReadError, read_oct_volume
from grok_pacs.analysis.preprocess import select_foveal_bscan
from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from training.cohort.pairing import Pair, drop_duplicates, pair_eyes
from training.cohort.pseudonym import load_or_create_salt, pseudonym
from training.cohort.report import REPORT_NAME, Unused, summary, write_report
from training.cohort.scan import scan_export
from training.cohort.tables import Keyed, read_labels, read_measurements
from training.manifest import MANIFEST_NAME, CohortRecord, load_manifest, write_manifest

log = logging.getLogger(__name__)

DESCRIPTION_NAME = "cohort.json"


@dataclass(frozen=True)
class BuildSettings:
    export_dir: Path
    labels: Path
    out_dir: Path
    salt_file: Path
    measurements: Path | None = None
    max_days: int = 30  # a CFP and an OCT of one eye are one visit when at most this many days apart
    seed: int = 0  # the split's seed
    val_fraction: float = 0.15  # of each label's subjects
    test_fraction: float = 0.15
    copy: bool = False  # copy the images instead of hard-linking them


@dataclass(frozen=True)
class Eye:
    pair: Pair
    label: Label
    fovea_frame: int
    fovea_method: str  #: "fovea" (a pit was found) or "central" (the runtime's fallback)


class NoUsableEyeError(ValueError):
    """Nothing in the export could be used; `unused` says why for every file and row."""

    def __init__(self, message: str, unused: list[Unused]) -> None:
        super().__init__(message)
        self.unused = unused


@dataclass(frozen=True)
class BuildResult:
    manifest: Path
    report: Path
    unused: list[Unused]
    counts: dict


def build_from_dicom(s: BuildSettings) -> BuildResult:
    """Build OUT/manifest.csv, OUT/cohort-report.json and OUT/cohort.json; every file or row left out is
    in the report with its reason. Raises ValueError (TableError, SaltError) before writing anything when
    the inputs cannot be used at all."""
    export, out = s.export_dir.resolve(), s.out_dir.resolve()
    _check_folders(export, out)
    salt = load_or_create_salt(s.salt_file, out)
    labels, unused = read_labels(s.labels)
    measurements, more = read_measurements(s.measurements) if s.measurements else (Keyed(), [])
    unused += more
    instances, more = scan_export(export)
    unused += more
    scanned = len(instances) + len(more)
    patients_seen = {i.patient_id for i in instances}
    instances, more = drop_duplicates(instances)
    unused += more
    pairs, more = pair_eyes(instances, s.max_days)
    unused += more
    eyes, more = _labelled(pairs, labels)
    unused += more
    eyes, more = _foveae(eyes)
    unused += more
    unused += _unused_rows("labels", labels, eyes, patients_seen)
    unused += _unused_rows("measurements", measurements, eyes, patients_seen)
    if not eyes:  # the report still says why, file by file
        out.mkdir(parents=True, exist_ok=True)
        report = write_report(out / REPORT_NAME, unused, {"files_scanned": scanned, "eyes": 0})
        raise NoUsableEyeError(f"no usable eye in {export} ({summary(unused)}); see {report}", unused)
    subjects = {e.pair.patient_id: pseudonym(salt, e.pair.patient_id) for e in eyes}
    splits = split_subjects(_subject_labels(eyes, subjects), s.seed, s.val_fraction, s.test_fraction)
    out.mkdir(parents=True, exist_ok=True)
    records, linked = _records(eyes, subjects, splits, measurements, out, s.copy)
    manifest = write_manifest(out / MANIFEST_NAME, records)
    load_manifest(manifest)  # the stages' own check: a manifest they would refuse is never handed over
    counts = _counts(records, unused, linked, scanned)
    report = write_report(out / REPORT_NAME, unused, counts)
    (out / DESCRIPTION_NAME).write_text(json.dumps(_description(s, counts), indent=1) + "\n", encoding="utf-8")
    return BuildResult(manifest, report, unused, counts)


def _check_folders(export: Path, out: Path) -> None:
    if not export.is_dir():
        raise ValueError(f"export folder {export} does not exist")
    if out == export or export in out.parents:
        raise ValueError(f"the output {out} must be outside the export {export} (a rerun would scan it)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"the output folder {out} is not empty: give a new one (old images would be mixed in)")


def _labelled(pairs: list[Pair], labels: Keyed) -> tuple[list[Eye], list[Unused]]:
    eyes, unused = [], []
    for pair in pairs:
        found = labels.lookup(pair.patient_id, pair.eye)
        if found is None:
            detail = "the labels CSV has no row for this patient and eye"
            unused += [
                Unused("export", pair.cfp.rel, "no label", detail),
                Unused("export", pair.oct.rel, "no label", detail),
            ]
            continue
        eyes.append(Eye(pair, found[1], -1, ""))
    return eyes, unused


def _foveae(eyes: list[Eye]) -> tuple[list[Eye], list[Unused]]:
    """The foveal B-scan of every OCT, chosen as the runtime chooses it (this decodes the OCT's pixels)."""
    kept, unused = [], []
    for eye in eyes:
        try:
            frame, method = select_foveal_bscan(read_oct_volume(eye.pair.oct.path))
        except (ImageReadError, ValueError) as exc:
            unused.append(Unused("export", eye.pair.oct.rel, "unreadable", f"OCT pixels: {exc}"))
            detail = f"its OCT {eye.pair.oct.rel} cannot be decoded"
            unused.append(Unused("export", eye.pair.cfp.rel, "unpaired", detail))
            continue
        kept.append(Eye(eye.pair, eye.label, frame, method))
    return kept, unused


def _unused_rows(source: str, table: Keyed, eyes: list[Eye], patients_seen: set[str]) -> list[Unused]:
    """Rows of a CSV that no kept eye used."""
    used = {(e.pair.patient_id, e.pair.eye) for e in eyes}
    unused = []
    for (patient, eye), row_no in table.rows.items():
        if (patient, eye) in used or (not eye and ((patient, "R") in used or (patient, "L") in used)):
            continue
        if patient not in patients_seen:
            detail = "no usable image of this patient in the export"
        else:
            detail = (
                f"no paired, labelled CFP and OCT of {'this eye' if eye else 'either eye'} (see the export's entries)"
            )
        unused.append(Unused(source, f"row {row_no}", "unknown subject", detail))
    return unused


def _subject_labels(eyes: list[Eye], subjects: dict[str, str]) -> dict[str, Label]:
    """A subject's stratum: its eyes' most common label (ties: the first in DIAGNOSTIC_LABELS order)."""
    per_subject: dict[str, Counter] = {}
    for e in eyes:
        per_subject.setdefault(subjects[e.pair.patient_id], Counter())[e.label] += 1
    return {
        subject: max(counts, key=lambda lab: (counts[lab], -DIAGNOSTIC_LABELS.index(lab)))
        for subject, counts in per_subject.items()
    }


def split_subjects(labels: dict[str, Label], seed: int, val: float, test: float) -> dict[str, str]:
    """train/val/test by subject, stratified by label, seeded (the phantom's rule: a label with 2 subjects
    puts one in test; with 3 or more, at least one each in val and test)."""
    rng = np.random.default_rng([seed, 0x5B17])
    splits = dict.fromkeys(labels, "train")
    for label in DIAGNOSTIC_LABELS:
        members = sorted(s for s, lab in labels.items() if lab == label)
        order = [members[i] for i in rng.permutation(len(members))]
        k = len(order)
        n_val = int(round(k * val)) or (1 if k >= 3 and val > 0 else 0)
        n_test = int(round(k * test)) or (1 if k >= 2 and test > 0 else 0)
        for subject in order[:n_test]:
            splits[subject] = "test"
        for subject in order[n_test : n_test + n_val]:
            splits[subject] = "val"
    return splits


def _records(
    eyes: list[Eye], subjects: dict[str, str], splits: dict[str, str], measurements: Keyed, out: Path, copy: bool
) -> tuple[list[CohortRecord], Counter]:
    records, linked = [], Counter()
    for e in sorted(eyes, key=lambda e: (subjects[e.pair.patient_id], e.pair.eye)):
        subject = subjects[e.pair.patient_id]
        folder = out / "images" / subject / e.pair.eye
        folder.mkdir(parents=True, exist_ok=True)
        cfp, oct_path = folder / "cfp.dcm", folder / "oct.dcm"
        linked[_place(e.pair.cfp.path, cfp, copy)] += 1
        linked[_place(e.pair.oct.path, oct_path, copy)] += 1
        found = measurements.lookup(e.pair.patient_id, e.pair.eye)
        values = found[1] if found else {}
        biomarkers = {b.key: float(values.get(b.key, np.nan)) for b in BIOMARKERS}
        meta = {
            "site": e.pair.oct.site or e.pair.cfp.site,
            "cfp_device": e.pair.cfp.device,
            "oct_device": e.pair.oct.device,
            "days_apart": str(e.pair.gap_days),
            "fovea_method": e.fovea_method,
        }
        fovea = e.fovea_frame if e.fovea_method == "fovea" else None
        records.append(
            CohortRecord(subject, e.pair.eye, e.label, splits[subject], cfp, oct_path, biomarkers, fovea, None, 0, meta)
        )
    return records, linked


def _place(source: Path, target: Path, copy: bool) -> str:
    """Hard-link `source` at `target` (no space used), or copy it when asked or when a link is impossible."""
    if not copy:
        try:
            os.link(source, target)
            return "linked"
        except OSError as exc:  # another file system, or one without hard links: a copy does the same job
            log.debug("cannot hard-link %s (%s): copying", source, exc)
    shutil.copy2(source, target)
    return "copied"


def _counts(records: list[CohortRecord], unused: list[Unused], linked: Counter, files: int) -> dict:
    keys = [b.key for b in BIOMARKERS]
    measured = sum(1 for r in records if any(not np.isnan(r.biomarkers[k]) for k in keys))
    return {
        "files_scanned": files,
        "files_used": 2 * len(records),
        "files_unused": sum(u.source == "export" for u in unused),
        "subjects": len({r.subject_id for r in records}),
        "eyes": len(records),
        "eyes_per_label": dict(sorted(Counter(r.label.value for r in records).items())),
        "eyes_per_split": dict(sorted(Counter(r.split for r in records).items())),
        "eyes_with_measurements": measured,
        "biomarker_values_present": sum(1 for r in records for k in keys if not np.isnan(r.biomarkers[k])),
        "fovea_found": sum(1 for r in records if r.fovea_frame is not None),
        "images": dict(linked),
    }


def _description(s: BuildSettings, counts: dict) -> dict:
    return {
        "synthetic": False,
        "generator": "training.cohort from-dicom",
        "max_days": s.max_days,
        "seed": s.seed,
        "split_fractions": {"val": s.val_fraction, "test": s.test_fraction},
        "pseudonyms": "S + first 16 hex of HMAC-SHA256(salt, PatientID); the salt is not in this folder",
        "visit": "one per eye: its latest CFP+OCT pair; no date is written",
        "counts": counts,
    }
