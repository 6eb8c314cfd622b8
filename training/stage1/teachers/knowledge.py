"""The Eye-Guideline knowledge (training/data/eye_guideline.yaml), loaded and checked.

Reference ranges are attached from grok_pacs.domain.biomarkers (never repeated in the YAML). Loading fails with
a message naming the entry when the YAML names an unknown biomarker or label, misses a label, or when its
human turn drifts from the paper's (docs/domain.md, The GROK model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, Biomarker, format_value
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label

DEFAULT_GUIDELINE = Path(__file__).resolve().parents[2] / "data" / "eye_guideline.yaml"
#: The human turn of every stage-1 record, exactly as the paper gives it (docs/domain.md, The GROK model).
HUMAN_TURN = (
    "<image>\nInterpret the retinal images, identify and analyze the key features and abnormalities, "
    "then write a single-paragraph evidence-based clinical diagnosis report that is supported by the findings."
)
DIRECTIONS = ("low", "high", "normal")
#: A report cites at least this many measured values; an eye with fewer measured cites all it has and says
#: what was not measured (`NOT_MEASURED`).
MIN_GROUNDED_NUMBERS = 3
#: The words by which a report for an eye with few measurements states what was not measured.
NOT_MEASURED = "not measured"


class KnowledgeError(ValueError):
    """The guideline file is malformed; the message names the entry."""


@dataclass(frozen=True)
class Sign:
    key: str
    direction: str  #: "low", "high" or "normal": the disease effect on this biomarker
    finding: str  #: the visual finding the number is tied to


@dataclass(frozen=True)
class LabelKnowledge:
    label: Label
    name: str
    terms: tuple[str, ...]
    signature: tuple[Sign, ...]
    lesions: dict[str, tuple[str, ...]]  #: subtype ("" = any) -> visible lesions
    rule_out: str
    inference: tuple[str, ...]
    periphery: str
    conclusion: dict[str, tuple[str, ...]]  #: subtype ("" = any) -> concluding diagnosis phrases
    wet_if: tuple[str, float] | None = None


@dataclass(frozen=True)
class PromptKnowledge:
    human_turn: str
    system: str
    question: str
    rules: tuple[str, ...]
    example: str
    formatting: str


@dataclass(frozen=True)
class Knowledge:
    labels: dict[Label, LabelKnowledge]
    overrides: dict[Label, dict[Label, str]]
    prompt: PromptKnowledge
    regions: tuple[str, ...]
    borderline_fraction: float

    def status(self, key: str, value: float) -> str:
        """'missing', 'low', 'low-normal', 'normal', 'high-normal' or 'high' against the schema's normal range."""
        if value is None or math.isnan(value):
            return "missing"
        lo, hi = BY_KEY[key].normal
        margin = (hi - lo) * self.borderline_fraction
        if value < lo:
            return "low"
        if value > hi:
            return "high"
        if value < lo + margin:
            return "low-normal"
        if value > hi - margin:
            return "high-normal"
        return "normal"

    def reference_ranges_text(self) -> str:
        """One line per biomarker: prompt name, normal range, unit (for the LLM teacher's prompt)."""
        return "\n".join(_range_line(b) for b in BIOMARKERS)


def _range_line(b: Biomarker) -> str:
    lo, hi = b.normal
    unit = f" {b.unit}" if b.unit != "1" else ""
    return f"- {b.prompt_name}: {format_value(b, lo)}-{format_value(b, hi)}{unit}"


def load_knowledge(path: Path | str = DEFAULT_GUIDELINE) -> Knowledge:
    """Read and check the guideline YAML."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KnowledgeError(f"{path}: cannot read the guideline: {exc}") from exc
    labels = {}
    for name, entry in (data.get("labels") or {}).items():
        label = _label(name, f"{path}: labels.{name}")
        labels[label] = _label_knowledge(label, entry, f"{path}: labels.{name}")
    missing = [lab.value for lab in DIAGNOSTIC_LABELS if lab not in labels]
    if missing:
        raise KnowledgeError(f"{path}: labels missing: {', '.join(missing)}")
    overrides = {
        _label(a, f"{path}: rule_out_overrides.{a}"): {
            _label(b, f"{path}: rule_out_overrides.{a}.{b}"): str(text) for b, text in inner.items()
        }
        for a, inner in (data.get("rule_out_overrides") or {}).items()
    }
    prompt = data.get("prompt") or {}
    if prompt.get("human_turn") != HUMAN_TURN:
        raise KnowledgeError(f"{path}: prompt.human_turn differs from the paper's human turn")
    fields = ("system", "question", "example", "formatting")
    if any(not prompt.get(f) for f in fields) or not prompt.get("rules"):
        raise KnowledgeError(f"{path}: prompt needs system, question, rules, example and formatting")
    prompt_k = PromptKnowledge(
        HUMAN_TURN,
        *(str(prompt[f]).strip() for f in ("system", "question")),
        tuple(str(r) for r in prompt["rules"]),
        str(prompt["example"]).strip(),
        str(prompt["formatting"]).strip(),
    )
    ranges = data.get("reference_ranges") or {}
    if ranges.get("source") != "grok_pacs.domain.biomarkers":
        raise KnowledgeError(
            f"{path}: reference_ranges.source must be grok_pacs.domain.biomarkers (the one source of truth)"
        )
    return Knowledge(
        labels, overrides, prompt_k, tuple(data.get("regions") or ()), float(ranges.get("borderline_fraction", 0.2))
    )


def _label(name: str, where: str) -> Label:
    try:
        label = Label(name)
    except ValueError:
        label = None
    if label not in DIAGNOSTIC_LABELS:
        raise KnowledgeError(f"{where}: unknown label {name!r}")
    return label


def _label_knowledge(label: Label, entry: dict[str, Any], where: str) -> LabelKnowledge:
    signs = []
    for i, sign in enumerate(entry.get("signature") or []):
        if sign.get("key") not in BY_KEY:
            raise KnowledgeError(f"{where}.signature[{i}]: unknown biomarker key {sign.get('key')!r}")
        if sign.get("direction") not in DIRECTIONS:
            raise KnowledgeError(f"{where}.signature[{i}]: direction must be one of {DIRECTIONS}")
        signs.append(Sign(sign["key"], sign["direction"], str(sign["finding"])))
    needed = ("terms", "inference", "rule_out", "periphery", "conclusion")
    if not signs or any(not entry.get(f) for f in needed):
        raise KnowledgeError(f"{where}: needs signature, {', '.join(needed)}")
    wet = entry.get("wet_if")
    if wet is not None and wet.get("key") not in BY_KEY:
        raise KnowledgeError(f"{where}.wet_if: unknown biomarker key {wet.get('key')!r}")
    lesions = {str(k): tuple(v) for k, v in (entry.get("lesions") or {}).items()}
    conclusion = {str(k): tuple(v) for k, v in entry["conclusion"].items()}
    return LabelKnowledge(
        label,
        str(entry["name"]),
        tuple(entry["terms"]),
        tuple(signs),
        lesions,
        str(entry["rule_out"]),
        tuple(entry["inference"]),
        str(entry["periphery"]),
        conclusion,
        (wet["key"], float(wet["above"])) if wet else None,
    )
