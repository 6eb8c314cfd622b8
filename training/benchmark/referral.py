"""Referral as a clinician reads it: urgent, routine ophthalmology, physician review and rescreen apart.

The disposition table (grok_pacs.report.dispositions) sends eyes to different people: urgent referral to
an ophthalmologist (wet AMD, DR with oedema), routine referral to an ophthalmologist (DR, dry AMD,
glaucoma suspicion, and eyes with no stated diagnosis or ungradable images: "no result means refer"),
review by the physician (hypertensive signs, Alzheimer-associated signs: not an eye clinic's work), and
rescreening. One "referred" figure mixes them; here each eye's disposition is read as its tier, for the
served reports and for the truth (the same table applied to the true label and measurements,
training.benchmark.safety.truth_dispositions), and scored as two questions:
- "needs an ophthalmologist" (urgent or routine ophthalmology): sensitivity and specificity;
- "urgent": sensitivity and specificity;
plus the tier-by-tier table (truth rows, served columns).
"""

from __future__ import annotations

from collections.abc import Sequence

from grok_pacs.analysis.result import Action, Disposition
from training.benchmark.safety import truth_dispositions

URGENT, OPHTHALMOLOGY, PHYSICIAN, RESCREEN = "urgent", "ophthalmology", "physician", "rescreen"
TIERS = (URGENT, OPHTHALMOLOGY, PHYSICIAN, RESCREEN)
#: Rules of the default table whose referral goes to the physician, not to an ophthalmologist.
PHYSICIAN_RULES = frozenset({"hypertension", "alzheimer"})


def tier(disposition: Disposition) -> str:
    """The tier of one eye's disposition (a retake counts as an ophthalmology referral: retake, or refer)."""
    if disposition.action is Action.URGENT_REFERRAL:
        return URGENT
    if disposition.action is Action.RESCREEN:
        return RESCREEN
    return PHYSICIAN if disposition.rule in PHYSICIAN_RULES else OPHTHALMOLOGY


def _sens_spec(predicted: Sequence[bool], truth: Sequence[bool]) -> dict:
    pos = [p for p, t in zip(predicted, truth) if t]
    neg = [p for p, t in zip(predicted, truth) if not t]
    return {
        "sensitivity": sum(pos) / len(pos) if pos else None,
        "specificity": sum(not p for p in neg) / len(neg) if neg else None,
        "n_positive": len(pos),
        "n_negative": len(neg),
    }


def tier_figures(served: Sequence[str], truth: Sequence[str]) -> dict:
    """Both questions' sensitivity/specificity and the tier table, from served and true tiers."""
    eye_clinic = (URGENT, OPHTHALMOLOGY)
    table = {t: {s: 0 for s in TIERS} for t in TIERS}
    for s, t in zip(served, truth, strict=True):
        table[t][s] += 1
    return {
        "needs_ophthalmologist": _sens_spec([s in eye_clinic for s in served], [t in eye_clinic for t in truth]),
        "urgent": _sens_spec([s == URGENT for s in served], [t == URGENT for t in truth]),
        "tiers": table,
    }


def referral_tiers(reports: Sequence, truth_labels: Sequence[str], truth_biomarkers: Sequence[dict]) -> dict:
    """`tier_figures` for served reports against the dispositions their truth calls for."""
    from grok_pacs.report.dispositions import for_eye

    served = [tier(r.disposition or for_eye(r)) for r in reports]
    truth = [tier(d) for d in truth_dispositions(reports, truth_labels, truth_biomarkers)]
    return tier_figures(served, truth)


def tier_markdown(figures: dict) -> str:
    """The two questions and the tier table as Markdown."""

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = ["| question | sensitivity | specificity | positives / negatives |", "|---|---|---|---|"]
    for name, label in (("needs_ophthalmologist", "needs an ophthalmologist"), ("urgent", "urgent")):
        f = figures[name]
        lines.append(
            f"| {label} | {cell(f['sensitivity'])} | {cell(f['specificity'])} | {f['n_positive']} / {f['n_negative']} |"
        )
    lines += ["", "| truth \\ served | " + " | ".join(TIERS) + " |", "|---" * (len(TIERS) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(str(figures["tiers"][t][s]) for s in TIERS) + " |" for t in TIERS]
    return "\n".join(lines)
