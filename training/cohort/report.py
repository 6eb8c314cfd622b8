"""What a cohort build could not use, and why: one entry per file or CSV row, never a silent drop.

Entries name export files by their path inside the export, CSV rows by their line number (header = 1) and
results of the register by their SR's SOP Instance UID, never by patient name or ID, so the report can sit
beside the manifest.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

#: Every reason an entry can carry (the JSON's `reason` field), in the order the table lists them.
REASONS = (
    "unreadable",  # not DICOM, truncated, or pixels that cannot be decoded
    "refused SOP class",  # not an OP (CFP) or OPT / OCT B-scan volume instance: CT, SR, thickness maps, ...
    "no patient ID",
    "no laterality",  # neither ImageLaterality, Laterality nor FrameLaterality is R or L
    "no date",  # no acquisition, content, series or study date: cannot be placed in a visit
    "duplicate",  # the same instance twice, or a second series of the same eye, modality and day
    "unpaired",  # no OCT (or CFP) of the same eye within --max-days
    "extra visit",  # an older paired visit of an eye (one visit per eye: the latest)
    "no label",  # images of an eye that the labels CSV does not label
    "unknown label",  # a labels row whose label is not a diagnostic label
    "unknown subject",  # a labels or measurements row for a patient/eye with no paired images
    "bad row",  # a CSV row without patient ID, with a bad eye, or repeating an earlier row
    "bad value",  # a measurement that is not a number or is outside its plausible range (left missing)
    # from-reviews (training/cohort/from_reviews.py): a reviewed result of the results register
    "rejected",  # the clinician rejected the AI result without giving the right label
    "withdrawn",  # the result was withdrawn after its review (`grok-pacs withdraw`): not a label to learn from
    "image gone",  # a source image the result used is no longer stored (retention purged it, or never received)
)
REPORT_NAME = "cohort-report.json"


@dataclass(frozen=True)
class Unused:
    source: str  #: "export", "labels", "measurements", or "register" (from-reviews)
    item: str  #: a path inside the export, or "row N" / "row N, column K" of a CSV
    reason: str  #: one of REASONS
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}; expected one of {REASONS}")


def summary(unused: Iterable[Unused]) -> dict[str, int]:
    """Entries per reason, in REASONS order, reasons with none left out."""
    counts = Counter(u.reason for u in unused)
    return {reason: counts[reason] for reason in REASONS if counts[reason]}


def write_report(path: Path, unused: list[Unused], counts: dict) -> Path:
    data = {"counts": counts, "unused_by_reason": summary(unused), "unused": [asdict(u) for u in _ordered(unused)]}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def table(unused: list[Unused]) -> str:
    """A plain-text table (reason, source, item, detail), grouped by reason."""
    if not unused:
        return "nothing left unused"
    rows = [(u.reason, u.source, u.item, u.detail) for u in _ordered(unused)]
    widths = [max(len(r[i]) for r in rows + [("reason", "source", "item", "")]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("reason", "source", "item"), widths)) + "  detail"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.append("unused: " + ", ".join(f"{n} {reason}" for reason, n in summary(unused).items()))
    return "\n".join(lines)


def _ordered(unused: Iterable[Unused]) -> list[Unused]:
    return sorted(unused, key=lambda u: (REASONS.index(u.reason), u.source, u.item))
