"""The GROK prompt (docs/domain.md, The GROK model): ChatML, the paper's system and human turns, the assistant target
format, and the (input_ids, labels) builder with loss on assistant tokens only.

Training (stage 3) and the runtime build prompts only here, so they cannot drift apart. The human turn
optionally carries the biomarker estimates (quantitative values first, then a qualitative reading against
the normal ranges of `grok_pacs.domain.biomarkers`) and a note naming a missing modality. The assistant writes one
findings paragraph and then a final line `Diagnosis: <Label>`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from grok_pacs.domain.biomarkers import BIOMARKERS, CFP_BIOMARKERS, OCT_BIOMARKERS, PROSE_NAMES, Biomarker, format_value
from grok_pacs.domain.labels import Label
from grok_pacs.domain.subtypes import amd_subtype

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_TOKEN = "<image>"
INSTRUCTION = (
    "Interpret the retinal images, identify and analyze the key features and abnormalities, then write a "
    "single-paragraph evidence-based clinical diagnosis report that is supported by the findings."
)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Tokens the tokenizer must treat as special (never split).
SPECIAL_TOKENS = (IM_START, IM_END, IMAGE_TOKEN)
DIAGNOSIS_PREFIX = "Diagnosis:"
PATTERN_PREFIX = "Closest biomarker pattern:"
IGNORE_INDEX = -100  #: label of tokens that carry no loss (transformers' convention)
MODALITY_NAMES = {"CFP": "colour fundus photograph", "OCT": "OCT volume"}


def _present(values: Mapping[str, float], b: Biomarker) -> bool:
    value = values.get(b.key)
    return value is not None and not math.isnan(float(value))


def _unit_suffix(b: Biomarker) -> str:
    return f" {b.unit}" if b.unit != "1" else ""


def biomarker_block(values: Mapping[str, float]) -> str:
    """The estimates as prompt text: quantitative values first, then a qualitative reading.

    Values outside a biomarker's normal range are listed as below / above normal; the rest are summarised as
    within normal limits. Missing or NaN values are left out. Empty string when nothing is known.
    """
    lines = []
    for title, group in (("OCT", OCT_BIOMARKERS), ("CFP", CFP_BIOMARKERS)):
        items = [
            f"{b.name} {format_value(b, float(values[b.key]))}{_unit_suffix(b)}" for b in group if _present(values, b)
        ]
        if items:
            lines.append(f"{title}: " + "; ".join(items) + ".")
    if not lines:
        return ""
    known = [b for b in BIOMARKERS if _present(values, b)]
    low = [b.name for b in known if float(values[b.key]) < b.normal[0]]
    high = [b.name for b in known if float(values[b.key]) > b.normal[1]]
    qualitative = []
    if low:
        qualitative.append("Below normal: " + "; ".join(low) + ".")
    if high:
        qualitative.append("Above normal: " + "; ".join(high) + ".")
    qualitative.append(
        "All other estimates are within normal limits." if low or high else "All estimates are within normal limits."
    )
    return "\n".join(
        ["Biomarker estimates (quantitative):", *lines, "Biomarker interpretation (qualitative):", *qualitative]
    )


#: The biomarkers the compact block always lists: the signature signs the Eye-Guideline reasons from for some
#: label (tests/analysis/test_model_grok.py checks this against training/data/eye_guideline.yaml). Others
#: appear only when outside their normal range.
COMPACT_KEYS: tuple[str, ...] = (
    "mt_central",
    "mt_overall",
    "mt_outer_inferior",
    "rnfl_average",
    "gcipl_average",
    "inl_average",
    "inl_elm_central",
    "rpe_average",
    "isos_rpe_central",
    "isos_rpe_average",
    "cup_to_disc",
    "avr",
    "tortuosity_arterial",
    "tortuosity_venular",
    "fd_arterial",
    "fd_venular",
)


def flag(b: Biomarker, value: float) -> str:
    """ "low" / "high" outside the normal range, "" inside it: the compact block's flags, which the concise
    reports copy (training.stage1.teachers.guideline), so both read them from here."""
    return "low" if value < b.normal[0] else "high" if value > b.normal[1] else ""


def _flagged(b: Biomarker, value: float) -> str:
    word = flag(b, value)
    return f"{PROSE_NAMES[b.key]} {format_value(b, value)}" + (f" ({word})" if word else "")


def pattern_line(label: Label | str, subtype: str | None = None) -> str:
    """The pattern head's answer (grok_pacs.model.pattern) as the prompt states it, by the label's name; for
    AMD with `subtype`, the subtype the estimates show (grok_pacs.domain.subtypes): "... AMD (dry)."."""
    label = Label(label)
    if label == Label.INDETERMINATE:
        raise ValueError("Indeterminate is not a biomarker pattern")
    shown = f" ({subtype})" if subtype and label == Label.AMD else ""
    return f"{PATTERN_PREFIX} {label.value}{shown}."


def compact_biomarker_block(
    values: Mapping[str, float], pattern: Label | str | None = None, pattern_subtype: bool = False
) -> str:
    """The estimates in few tokens: the `COMPACT_KEYS` with `(low)`/`(high)` flags, then any other estimate
    outside its normal range; the rest are said to be within normal limits. With `pattern` (the bundle's
    pattern head's closest label for these estimates), a last line names it, and with `pattern_subtype` the
    AMD subtype these estimates show when that label is AMD (a 135M model given only the central IS/OS-RPE
    number wrote wet lesions over a dry eye's 56 um; the line states what the referral reads).

    For CPU presets where every prompt token costs training and decoding time (about 320 SmolLM2 tokens
    instead of 750); the names are the ones the reports use (`PROSE_NAMES`), so a cited number sits next to
    the same words in prompt and report. The SR still carries every estimate.
    """
    known = [b for b in BIOMARKERS if _present(values, b)]
    if not known:
        return ""
    listed = [_flagged(b, float(values[b.key])) for b in known if b.key in COMPACT_KEYS]
    others = [
        _flagged(b, float(values[b.key])) for b in known if b.key not in COMPACT_KEYS and flag(b, float(values[b.key]))
    ]
    lines = ["Biomarker estimates (um for thicknesses):"]
    if listed:
        lines.append("; ".join(listed) + ".")
    lines.append(
        "Also outside normal limits: " + "; ".join(others) + "." if others else "All other estimates are normal."
    )
    if pattern is not None:
        lines.append(pattern_line(pattern, amd_subtype(values) if pattern_subtype else None))
    return "\n".join(lines)


def human_turn(
    biomarkers: Mapping[str, float] | None = None,
    missing: Sequence[str] = (),
    *,
    compact: bool = False,
    pattern: Label | str | None = None,
    pattern_subtype: bool = False,
) -> str:
    """The user message: `<image>`, the paper's instruction, optional estimates and missing-modality note.

    `compact` writes the estimates with `compact_biomarker_block` (the bundle's
    `generation.compact_biomarkers` says which block its model was trained with); `pattern` adds its
    pattern line (compact block only: the pattern head came after the full block's presets), with the AMD
    subtype where `pattern_subtype` (`generation.pattern_subtype`).
    """
    if pattern is not None and not compact:
        raise ValueError("the pattern line belongs to the compact biomarker block")
    parts = [f"{IMAGE_TOKEN}\n{INSTRUCTION}"]
    for modality in missing:
        if modality not in MODALITY_NAMES:
            raise ValueError(f"unknown modality {modality!r}; expected CFP or OCT")
        parts.append(f"No {MODALITY_NAMES[modality]} ({modality}) is available for this eye.")
    block = (
        compact_biomarker_block(biomarkers or {}, pattern, pattern_subtype)
        if compact
        else biomarker_block(biomarkers or {})
    )
    if block:
        parts.append(block)
    return "\n\n".join(parts)


def chat_prompt(human: str) -> str:
    """ChatML up to and including the assistant header (what generation continues)."""
    return f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{human}{IM_END}\n{IM_START}assistant\n"


def build_prompt(
    biomarkers: Mapping[str, float] | None = None,
    missing: Sequence[str] = (),
    *,
    compact: bool = False,
    pattern: Label | str | None = None,
    pattern_subtype: bool = False,
) -> str:
    """The full generation prompt for one eye."""
    return chat_prompt(
        human_turn(biomarkers, missing, compact=compact, pattern=pattern, pattern_subtype=pattern_subtype)
    )


def format_target(narrative: str, label: Label | str) -> str:
    """The assistant target: one findings paragraph (newlines flattened), then `Diagnosis: <Label>`."""
    label = Label(label)
    if label == Label.INDETERMINATE:
        raise ValueError("Indeterminate is never a training label")
    paragraph = " ".join(narrative.split())
    return f"{paragraph}\n{DIAGNOSIS_PREFIX} {label.value}"


@dataclass(frozen=True)
class TrainingExample:
    input_ids: list[int]  #: prompt + target + <|im_end|>; one image token
    labels: list[int]  #: IGNORE_INDEX on the prompt, token ids on the assistant reply (incl. <|im_end|>)
    truncated: bool  #: the target was cut to fit max_length


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptOptions(TypedDict, total=False):
    """`build_prompt`'s arguments, as keywords of `build_training_example` (the prompt a record trains on is
    the one the engine builds)."""

    biomarkers: Mapping[str, float] | None
    missing: Sequence[str]
    compact: bool
    pattern: Label | str | None
    pattern_subtype: bool


def build_training_example(
    tokenizer: Any,
    target: str,
    *,
    max_length: int = 2048,
    visual_tokens: int = 392,
    **prompt: Unpack[PromptOptions],
) -> TrainingExample:
    """Token ids and labels for one SFT record; the loss falls on the assistant reply only. `prompt`: the
    keywords of `build_prompt` (biomarkers, missing, compact, pattern, pattern_subtype).

    `max_length` counts the visual embeddings that will replace the image token (`visual_tokens`; 392 with
    both modalities, 197 with one, since a missing modality is one placeholder). The target is truncated
    when needed, never the prompt.
    """
    prompt_ids = _encode(tokenizer, build_prompt(**prompt))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if prompt_ids.count(image_id) != 1:
        raise ValueError(f"the tokenizer does not keep {IMAGE_TOKEN} as one special token")
    target_ids = _encode(tokenizer, target + IM_END)
    room = max_length - (len(prompt_ids) - 1 + visual_tokens)
    if room <= 0:
        raise ValueError(
            f"max_length {max_length} leaves no room for the answer (prompt + visual tokens = "
            f"{len(prompt_ids) - 1 + visual_tokens})"
        )
    truncated = len(target_ids) > room
    target_ids = target_ids[:room]
    return TrainingExample(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, truncated)


def prompt_template() -> dict[str, str]:
    """What the bundle manifest records about the prompt."""
    return {
        "format": "chatml",
        "system": SYSTEM_PROMPT,
        "human": f"{IMAGE_TOKEN}\n{INSTRUCTION}",
        "image_token": IMAGE_TOKEN,
        "diagnosis_prefix": DIAGNOSIS_PREFIX,
        "target": "<one findings paragraph>\\nDiagnosis: <Label>",
    }
