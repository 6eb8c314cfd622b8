"""Dispositions: what should happen next, per eye and per patient, from one ordered table
(docs/domain.md, Dispositions).

Each row names its guideline source. The first row that matches an eye's gradability, label and biomarker
condition gives its disposition. The patient-level roll-up takes the most severe eye (urgent referral >
referral > retake > rescreen; among rescreens the shortest interval), adds a referral for cup-to-disc
asymmetry between the eyes, and reports systemic labels (diabetes, hypertension, Alzheimer's) once per
patient. A site replaces the table with a TOML file (`disposition_table` setting) of `[[rule]]` rows with
the same fields as `Rule` (see docs/design/safety.md, "Dispositions").
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grok_pacs.analysis.result import ACTION_ORDER, Action, Disposition, Gradability, Report
from grok_pacs.domain.biomarkers import BY_KEY
from grok_pacs.domain.labels import Label
from grok_pacs.domain.subtypes import COMPARISONS, WET_AMD_SIGNS

SYSTEMIC_LABELS = (Label.DIABETES, Label.HYPERTENSION, Label.ALZHEIMER)
CDR_ASYMMETRY = 0.2  #: cup-to-disc difference between the eyes that suggests glaucoma (docs/domain.md, Dispositions)


MET, WITHIN_ERROR = "met", "within error"  #: how a row's condition held (Rule.match)


class DispositionTableError(ValueError):
    """A disposition table that cannot work; names the row and the field."""


@dataclass(frozen=True)
class Rule:
    """One row: when (gradability, label, optional biomarker condition) -> what (action, text, source)."""

    rule: str  #: row id, written in the SR
    action: Action
    text: str
    source: str  #: guideline the row comes from
    gradability: str = "gradable"  #: "gradable", "not-gradable" (ungradable or out of scope) or "*"
    label: str = "*"  #: a Label value or "*"
    biomarker: str | None = None  #: grok_pacs.domain.biomarkers key the condition reads
    op: str | None = None  #: ">=", ">", "<=", "<"
    value: float | None = None
    rescreen_months: int | None = None
    #: the condition also holds when the estimate is within its typical error (BiomarkerEstimate.error) of the
    #: threshold on the side that meets it: a sign that cannot be ruled out (the default table's urgent rows)
    cautious: bool = False

    def __post_init__(self) -> None:
        where = f"disposition rule {self.rule!r}"
        if not isinstance(self.action, Action):
            object.__setattr__(self, "action", _enum(Action, self.action, f"{where}: action"))
        if self.gradability not in ("gradable", "not-gradable", "*"):
            raise DispositionTableError(f"{where}: gradability {self.gradability!r} is not gradable/not-gradable/*")
        if self.label != "*":
            _enum(Label, self.label, f"{where}: label")
        if (self.biomarker, self.op, self.value).count(None) not in (0, 3):
            raise DispositionTableError(f"{where}: biomarker, op and value go together")
        if self.biomarker is not None and (self.biomarker not in BY_KEY or self.op not in COMPARISONS):
            raise DispositionTableError(f"{where}: unknown biomarker {self.biomarker!r} or op {self.op!r}")
        if self.cautious and self.biomarker is None:
            raise DispositionTableError(f"{where}: cautious needs a biomarker condition")
        try:
            self.disposition()
        except ValueError as exc:
            raise DispositionTableError(f"{where}: {exc}") from exc

    def matches(self, report: Report) -> bool:
        return self.match(report) is not None

    def match(self, report: Report) -> str | None:
        """None when the row does not apply; MET when it does; WITHIN_ERROR when only a cautious row's margin
        makes its condition hold."""
        gradable = report.gradability is Gradability.GRADABLE
        if self.gradability != "*" and (self.gradability == "gradable") != gradable:
            return None
        if self.label != "*" and report.label.value != self.label:
            return None
        if self.biomarker is None:
            return MET
        found = next((b for b in report.biomarkers if b.key == self.biomarker), None)
        if found is None:
            return None
        if COMPARISONS[self.op](found.value, self.value):
            return MET
        if self.cautious and found.error:
            toward = found.value + found.error if self.op in (">", ">=") else found.value - found.error
            return WITHIN_ERROR if COMPARISONS[self.op](toward, self.value) else None
        return None

    def disposition(self) -> Disposition:
        return Disposition(self.action, self.text, self.source, self.rule, self.rescreen_months)


def _enum(kind, value, where):
    try:
        return kind(value)
    except ValueError as exc:
        raise DispositionTableError(f"{where} {value!r} is not one of {[k.value for k in kind]}") from exc


def _urgent_signs(rule_ids: tuple[str, ...], label: str, text: str, source: str) -> tuple[Rule, ...]:
    """One urgent-referral row per sign of wet AMD (grok_pacs.domain.subtypes) for eyes with `label`."""
    return tuple(
        Rule(
            rule_id,
            Action.URGENT_REFERRAL,
            text.format(meaning=sign.meaning),
            label=label,
            biomarker=sign.key,
            op=sign.op,
            value=sign.value,
            source=source,
            cautious=True,
        )
        for rule_id, sign in zip(rule_ids, WET_AMD_SIGNS, strict=True)
    )


_DESP = "NHS Diabetic Eye Screening Programme grading definitions"
#: The default table, first match wins (docs/domain.md, Dispositions, gives each source in full).
DEFAULT_TABLE: tuple[Rule, ...] = (
    Rule(
        "ungradable",
        Action.RETAKE,
        "Image quality insufficient: retake, or refer",
        gradability="not-gradable",
        source="IDx-DR / EyeArt practice: no result means refer; ungradable -> retake, then refer",
    ),
    Rule(
        "dr-oedema",
        Action.URGENT_REFERRAL,
        "Urgent referral: diabetic retinopathy with centre-involving oedema signs",
        label="DiabeticRetinopathy",
        biomarker="mt_central",
        op=">=",
        value=300.0,
        source=f"{_DESP}: R3/M1 urgent",
        cautious=True,
    ),
    Rule(
        "dr",
        Action.REFERRAL,
        "Refer to ophthalmology: referable diabetic retinopathy",
        label="DiabeticRetinopathy",
        source=f"{_DESP}: referable DR",
    ),
    # one urgent row per sign of wet AMD, the criterion the narrative validator also holds the words to
    *_urgent_signs(
        ("amd-wet-fluid", "amd-wet"),
        "AMD",
        "Urgent referral (within about 2 weeks): suspected neovascular AMD ({meaning})",
        "RCOphth / NICE NG82: suspected wet AMD seen within 2 weeks",
    ),
    Rule(
        "amd",
        Action.REFERRAL,
        "Routine referral: dry age-related macular degeneration",
        label="AMD",
        source="RCOphth / NICE NG82: dry AMD routine",
    ),
    Rule(
        "glaucoma-cdr",
        Action.REFERRAL,
        "Refer to ophthalmology: glaucoma suspicion (cup-to-disc >= 0.7)",
        biomarker="cup_to_disc",
        op=">=",
        value=0.7,
        source="AAO POAG Suspect PPP: glaucoma suspicion, CDR >= 0.7",
    ),
    Rule(
        "glaucoma",
        Action.REFERRAL,
        "Refer to ophthalmology: glaucoma suspicion",
        label="Glaucoma",
        source="AAO POAG Suspect PPP: glaucoma suspicion -> refer",
    ),
    Rule(
        "hypertension",
        Action.REFERRAL,
        "Blood-pressure assessment by the physician (hypertensive signs)",
        label="Hypertension",
        source="Wong & Mitchell, NEJM 2004: hypertensive signs -> blood pressure assessed by the physician",
    ),
    Rule(
        "alzheimer",
        Action.REFERRAL,
        "Physician review: retinal signs associated with Alzheimer's disease",
        label="Alzheimer",
        source="No screening guideline; project rule: a systemic finding goes to the physician",
    ),
    Rule(
        "diabetes",
        Action.RESCREEN,
        "Diabetes without retinopathy signs: rescreen in 12 months",
        label="Diabetes",
        rescreen_months=12,
        source=f"{_DESP}: R0 annual rescreen",
    ),
    Rule(
        "normal",
        Action.RESCREEN,
        "No abnormality found: routine rescreen",
        label="Normal",
        rescreen_months=24,
        source="AAO Adult Eye Evaluation PPP: routine rescreen; interval a site choice",
    ),
    # an eye left without a diagnosis that shows fluid or central thickening is seen urgently, whatever the cause
    *_urgent_signs(
        ("indeterminate-fluid", "indeterminate-thickening"),
        "Indeterminate",
        "No diagnosis could be determined, but the measurements show {meaning}: urgent referral",
        "RCOphth / NICE NG82: suspected wet AMD seen within 2 weeks; no result means refer",
    ),
    Rule(
        "indeterminate",
        Action.REFERRAL,
        "No diagnosis could be determined: refer for clinical review",
        source="IDx-DR / EyeArt practice: no result means refer",
    ),
)


def load_table(path: Path | None) -> tuple[Rule, ...]:
    """The site's table (TOML `[[rule]]` rows) or the default; DispositionTableError names what is wrong."""
    if path is None:
        return DEFAULT_TABLE
    try:
        rows = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("rule", [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DispositionTableError(f"disposition table {path}: {exc}") from exc
    if not rows:
        raise DispositionTableError(f"disposition table {path}: no [[rule]] rows")
    names = {f.name for f in dataclasses.fields(Rule)}
    for row in rows:
        if set(row) - names:
            raise DispositionTableError(f"disposition table {path}: unknown field(s) {sorted(set(row) - names)}")
    table = tuple(Rule(**row) for row in rows)
    if not any(
        r.gradability in ("not-gradable", "*") and r.label == "*" and r.biomarker is None for r in table
    ) or not any(r.gradability in ("gradable", "*") and r.label == "*" and r.biomarker is None for r in table):
        raise DispositionTableError(
            f"disposition table {path}: needs catch-all rows for gradable and not-gradable eyes"
        )
    return table


def first_match(report: Report, table: Sequence[Rule] = DEFAULT_TABLE) -> tuple[Rule, str]:
    """The first row that matches, and how (MET or WITHIN_ERROR); a table without a match is an error (never
    a silent none)."""
    for rule in table:
        how = rule.match(report)
        if how is not None:
            return rule, how
    raise DispositionTableError(
        f"no disposition rule matches eye {report.eye.value} ({report.gradability.value}, {report.label.value})"
    )


def for_eye(report: Report, table: Sequence[Rule] = DEFAULT_TABLE) -> Disposition:
    """The first matching row's disposition; one held only by an estimate's error says so."""
    rule, how = first_match(report, table)
    return _within_error(rule, report) if how == WITHIN_ERROR else rule.disposition()


def _within_error(rule: Rule, report: Report) -> Disposition:
    """A cautious row held by the estimate's error: its disposition, saying so."""
    found = next(b for b in report.biomarkers if b.key == rule.biomarker)
    unit = "" if BY_KEY[rule.biomarker].unit == "1" else f" {BY_KEY[rule.biomarker].unit}"
    note = (
        f" ({BY_KEY[rule.biomarker].name} estimated {found.value:.1f}{unit}, within its typical error of "
        f"{found.error:.1f}{unit} of the {rule.op} {rule.value:g} threshold: the sign cannot be ruled out)"
    )
    base = rule.disposition()
    return dataclasses.replace(base, text=base.text + note)


def _severity(d: Disposition) -> tuple[int, int]:
    return ACTION_ORDER.index(d.action), d.rescreen_months or 0


def roll_up(reports: Sequence[Report]) -> Disposition:
    """Patient level over the eyes' dispositions (each report must carry one): the most severe decides."""
    if not reports or any(r.disposition is None for r in reports):
        raise ValueError("roll_up needs reports that carry their eye's disposition")
    worst = min(_severity(r.disposition) for r in reports)
    deciding = [r for r in reports if _severity(r.disposition) == worst]
    chosen = deciding[0].disposition
    cdr = [
        b.value
        for r in reports
        if r.gradability is Gradability.GRADABLE
        for b in r.biomarkers
        if b.key == "cup_to_disc"
    ]
    if len(cdr) == 2 and abs(cdr[0] - cdr[1]) >= CDR_ASYMMETRY and ACTION_ORDER.index(chosen.action) > 1:
        chosen = Disposition(
            Action.REFERRAL,
            f"Refer to ophthalmology: cup-to-disc asymmetry {abs(cdr[0] - cdr[1]):.2f} >= {CDR_ASYMMETRY}",
            "AAO POAG Suspect PPP: CDR asymmetry >= 0.2 between the eyes",
            "glaucoma-asymmetry",
        )
        deciding = list(reports)
    systemic = tuple(sorted({r.label.value for r in reports if r.diagnosed and r.label in SYSTEMIC_LABELS}))
    return dataclasses.replace(chosen, systemic=systemic, eyes=tuple(r.eye.value for r in deciding))


def apply(reports: Sequence[Report], table: Sequence[Rule] = DEFAULT_TABLE) -> list[Report]:
    """The reports with their eye disposition and the patient roll-up over all of them."""
    with_eye = [dataclasses.replace(r, disposition=for_eye(r, table)) for r in reports]
    patient = roll_up(with_eye) if with_eye else None
    return [dataclasses.replace(r, patient_disposition=patient) for r in with_eye]
