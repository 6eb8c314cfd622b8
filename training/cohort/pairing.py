"""From usable instances to one CFP + OCT pair per eye: duplicates out, nearest dates paired, latest visit kept.

Every instance that does not end in a pair gets an Unused entry naming what was kept instead, so the
team can check the choice.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from training.cohort.report import Unused
from training.cohort.scan import Instance


@dataclass(frozen=True)
class Pair:
    patient_id: str
    eye: str
    cfp: Instance
    oct: Instance

    @property
    def gap_days(self) -> int:
        return abs((self.oct.day - self.cfp.day).days)


def drop_duplicates(instances: list[Instance]) -> tuple[list[Instance], list[Unused]]:
    """One instance per SOP Instance UID, then one per patient, eye, modality and day (an OCT with the most
    frames, else the first by path): a series exported twice or acquired twice the same day is a duplicate."""
    unused: list[Unused] = []
    by_uid: dict[str, Instance] = {}
    for inst in instances:
        first = by_uid.get(inst.sop_uid) if inst.sop_uid else None
        if first is not None:
            unused.append(_dup(inst, f"same SOP Instance UID as {first.rel}"))
        else:
            by_uid[inst.sop_uid or inst.rel] = inst
    groups: dict[tuple, list[Instance]] = defaultdict(list)
    for inst in by_uid.values():
        groups[(inst.patient_id, inst.eye, inst.kind, inst.day)].append(inst)
    kept: list[Instance] = []
    for members in groups.values():
        members.sort(key=lambda i: (-i.frames if i.kind == "OCT" else 0, i.rel))
        kept.append(members[0])
        what = f"another {members[0].kind} of this eye on the same day is kept: {members[0].rel}"
        unused.extend(_dup(other, what) for other in members[1:])
    return sorted(kept, key=lambda i: i.rel), unused


def _dup(inst: Instance, detail: str) -> Unused:
    return Unused("export", inst.rel, "duplicate", detail)


def pair_eyes(instances: list[Instance], max_days: int) -> tuple[list[Pair], list[Unused]]:
    """Pair each eye's CFPs and OCTs, closest dates first, at most `max_days` apart; then keep each eye's
    latest pair (by OCT date) and report the older ones as extra visits."""
    by_eye: dict[tuple[str, str], list[Instance]] = defaultdict(list)
    for inst in instances:
        by_eye[(inst.patient_id, inst.eye)].append(inst)
    pairs: list[Pair] = []
    unused: list[Unused] = []
    for (patient, eye), members in sorted(by_eye.items()):
        eye_pairs, eye_unused = _pair_one_eye(patient, eye, members, max_days)
        unused.extend(eye_unused)
        if not eye_pairs:
            continue
        eye_pairs.sort(key=lambda p: (p.oct.day, p.cfp.day, p.oct.rel))
        latest = eye_pairs[-1]
        pairs.append(latest)
        for older in eye_pairs[:-1]:
            detail = f"an older visit of this eye ({(latest.oct.day - older.oct.day).days} days before the kept one)"
            unused += [Unused("export", older.cfp.rel, "extra visit", detail)]
            unused += [Unused("export", older.oct.rel, "extra visit", detail)]
    return pairs, unused


def _pair_one_eye(patient: str, eye: str, members: list[Instance], max_days: int) -> tuple[list[Pair], list[Unused]]:
    cfps = [m for m in members if m.kind == "CFP"]
    octs = [m for m in members if m.kind == "OCT"]
    candidates = sorted(
        (abs((o.day - c.day).days), o.day, c.rel, o.rel, c, o)
        for c in cfps
        for o in octs
        if abs((o.day - c.day).days) <= max_days
    )
    used: set[str] = set()
    pairs: list[Pair] = []
    for _gap, _day, c_rel, o_rel, cfp, oct_ in candidates:
        if c_rel in used or o_rel in used:
            continue
        used.update((c_rel, o_rel))
        pairs.append(Pair(patient, eye, cfp, oct_))
    unused = []
    for inst in members:
        if inst.rel not in used:
            other = "OCT" if inst.kind == "CFP" else "CFP"
            detail = f"no {other} of the same eye within {max_days} days"
            unused.append(Unused("export", inst.rel, "unpaired", detail))
    return pairs, unused
