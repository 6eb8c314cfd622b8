"""What a bundle records of the cohort it was trained on, and of the code that trained it.

The fingerprint identifies the cohort without naming anyone: the manifest's sha256 (what `sha256sum
manifest.csv` prints), eyes per label and split, and the sites and devices its `meta_site`,
`meta_device`, `meta_cfp_device` and `meta_oct_device` columns name (training.cohort from-dicom writes
them from InstitutionName / Manufacturer + model; a phantom cohort has none).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from collections import Counter
from pathlib import Path

from training.manifest import load_manifest

SITE_KEYS = ("site",)
DEVICE_KEYS = ("device", "cfp_device", "oct_device")


def manifest_sha256(manifest: Path) -> str:
    return hashlib.sha256(Path(manifest).read_bytes()).hexdigest()


def cohort_fingerprint(manifest: Path) -> dict:
    """Counts and identity of a manifest's cohort (the manifest is checked as the stages check it)."""
    records = load_manifest(manifest)
    per_split_label: dict[str, Counter] = {}
    for r in records:
        per_split_label.setdefault(r.split, Counter())[r.label.value] += 1
    values = [v for r in records for v in r.biomarkers.values()]
    return {
        "manifest_sha256": manifest_sha256(manifest),
        "subjects": len({r.subject_id for r in records}),
        "eyes": len(records),
        "eyes_per_label": dict(sorted(Counter(r.label.value for r in records).items())),
        "eyes_per_split": dict(sorted(Counter(r.split for r in records).items())),
        "eyes_per_split_and_label": {s: dict(sorted(c.items())) for s, c in sorted(per_split_label.items())},
        "sites": _named(records, SITE_KEYS),
        "devices": _named(records, DEVICE_KEYS),
        "biomarker_values_present": round(sum(not math.isnan(v) for v in values) / max(len(values), 1), 4),
    }


def _named(records, keys: tuple[str, ...]) -> dict[str, int]:
    """Eyes per value of the given meta columns (empty values are not counted: unknown)."""
    counts = Counter(r.meta[k] for r in records for k in keys if r.meta.get(k))
    return dict(sorted(counts.items()))


def code_commit(repo: Path | None = None) -> dict:
    """The commit the code was run from (`git rev-parse HEAD`), and whether the work tree differed from it;
    "unknown" outside a git checkout or without git."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        # --no-optional-locks: reading the state must not take the index lock from a commit in progress
        status = ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout (an installed wheel)
        return {"commit": "unknown", "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
