"""The biomarker pattern head (grok_pacs.model.pattern, fitted by training.pattern): the label the estimates
resemble most, stored in the bundle and written at the end of the compact prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest

from devtools.tiny_bundle import copy_bundle
from grok_pacs.analysis.bundle import MANIFEST, BundleError, file_table
from grok_pacs.analysis.engine import Engine
from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.model.pattern import PATTERN_HEAD_FILE, PatternHead, PatternHeadError
from grok_pacs.model.prompt import build_prompt, compact_biomarker_block
from training.pattern import fit_pattern_head

MID = {b.key: float(np.mean(b.normal)) for b in BIOMARKERS}


def _cohort(n_per_label: int = 30, seed: int = 0) -> tuple[list[dict[str, float]], list[Label]]:
    """Eyes whose one signature biomarker per label is pushed up by four of its normal range's widths."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for i, label in enumerate(DIAGNOSTIC_LABELS):
        b = BIOMARKERS[i * 5]
        for _ in range(n_per_label):
            row = {k: v * (1 + 0.01 * rng.standard_normal()) for k, v in MID.items()}
            if label != Label.NORMAL:
                row[b.key] += 4 * (b.normal[1] - b.normal[0])
            rows.append(row)
            labels.append(label)
    return rows, labels


def test_fitted_head_names_each_label_from_its_pattern():
    rows, labels = _cohort()
    head = fit_pattern_head(rows, labels)
    test_rows, test_labels = _cohort(seed=1)
    assert [head.closest(row) for row in test_rows] == test_labels
    probabilities = head.probabilities(test_rows[0])
    assert set(probabilities) == set(DIAGNOSTIC_LABELS) and sum(probabilities.values()) == pytest.approx(1.0)


def test_missing_estimates_count_as_the_training_mean():
    rows, labels = _cohort()
    head = fit_pattern_head(rows, labels)
    assert head.probabilities({}) == pytest.approx(head.probabilities(dict(zip(MID, head.mean))))
    assert head.probabilities({"cup_to_disc": float("nan")}) == pytest.approx(head.probabilities({}))


def test_saved_head_loads_with_the_same_answers_and_a_broken_one_fails_loudly(tmp_path):
    rows, labels = _cohort()
    head = fit_pattern_head(rows, labels)
    loaded = PatternHead.load(head.save(tmp_path / PATTERN_HEAD_FILE))
    assert loaded.probabilities_batch(rows) == pytest.approx(head.probabilities_batch(rows))
    data = json.loads((tmp_path / PATTERN_HEAD_FILE).read_text())
    data["scale"][3] = 0.0
    (tmp_path / "zero_scale.json").write_text(json.dumps(data))
    with pytest.raises(PatternHeadError, match="scale"):
        PatternHead.load(tmp_path / "zero_scale.json")
    data = json.loads((tmp_path / PATTERN_HEAD_FILE).read_text())
    data["keys"] = data["keys"][::-1]
    (tmp_path / "keys.json").write_text(json.dumps(data))
    with pytest.raises(PatternHeadError, match="keys"):
        PatternHead.load(tmp_path / "keys.json")
    with pytest.raises(PatternHeadError, match="labels"):
        PatternHead(head.mean, head.scale, head.weight, head.bias, (Label.INDETERMINATE, *DIAGNOSTIC_LABELS[1:]))


def test_compact_prompt_ends_with_the_pattern_line():
    block = compact_biomarker_block(MID, Label.GLAUCOMA)
    assert block.endswith("\nAll other estimates are normal.\nClosest biomarker pattern: Glaucoma.")
    assert compact_biomarker_block(MID).endswith("All other estimates are normal.")
    assert "Closest biomarker pattern: Glaucoma." in build_prompt(MID, compact=True, pattern="Glaucoma")
    with pytest.raises(ValueError, match="compact"):
        build_prompt(MID, pattern=Label.GLAUCOMA)
    with pytest.raises(ValueError, match="Indeterminate"):
        compact_biomarker_block(MID, Label.INDETERMINATE)


def test_the_pattern_line_names_the_amd_subtype_the_estimates_show_when_asked():
    """The demo's dry AMD eye (central IS/OS-RPE 56 um, central subfield 280 um) got wet lesions from a model
    that saw only the numbers; bundles trained with `pattern_subtype` read the subtype in the line."""
    dry = MID | {"isos_rpe_central": 56.0, "mt_central": 280.0}
    wet = MID | {"isos_rpe_central": 118.0, "mt_central": 352.0}
    assert compact_biomarker_block(dry, Label.AMD, True).endswith("\nClosest biomarker pattern: AMD (dry).")
    assert compact_biomarker_block(wet, Label.AMD, True).endswith("\nClosest biomarker pattern: AMD (wet).")
    assert compact_biomarker_block(wet, Label.AMD).endswith("\nClosest biomarker pattern: AMD.")  # as trained before
    assert compact_biomarker_block(wet, Label.DIABETIC_RETINOPATHY, True).endswith("pattern: DiabeticRetinopathy.")
    no_oct = {k: v for k, v in dry.items() if k not in ("isos_rpe_central", "mt_central")}
    assert compact_biomarker_block(no_oct, Label.AMD, True).endswith("pattern: AMD.")  # nothing to show it by
    assert build_prompt(dry, compact=True, pattern="AMD", pattern_subtype=True).count("AMD (dry).") == 1


def _with_pattern_head(bundle, head: PatternHead, compact: bool):
    manifest = json.loads((bundle / MANIFEST).read_text())
    head.save(bundle / PATTERN_HEAD_FILE)
    manifest["pattern_head"] = {"file": PATTERN_HEAD_FILE}
    manifest["config"]["generation"].update(compact_biomarkers=compact, biomarkers_in_prompt=True)
    manifest["files"] = file_table(bundle)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return bundle


def test_engine_writes_the_bundles_pattern_into_every_prompt(tiny_bundle, tmp_path):
    rows, labels = _cohort()
    head = fit_pattern_head(rows, labels)
    engine = Engine.from_bundle(_with_pattern_head(copy_bundle(tiny_bundle, tmp_path / "b"), head, True))
    assert engine.pattern_head is not None
    for row, label in zip(*_cohort(n_per_label=1, seed=2)):
        prompt = engine.prompt(row)
        assert prompt.endswith(f"Closest biomarker pattern: {label.value}.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(BundleError, match="compact"):
        Engine.from_bundle(_with_pattern_head(copy_bundle(tiny_bundle, tmp_path / "c"), head, False))
    amd = _with_pattern_head(copy_bundle(tiny_bundle, tmp_path / "d"), fit_pattern_head(*_amd_cohort()), True)
    dry = MID | {"isos_rpe_central": 56.0, "mt_central": 280.0}
    assert Engine.from_bundle(amd).prompt(dry).endswith("pattern: AMD.<|im_end|>\n<|im_start|>assistant\n")
    assert (
        Engine.from_bundle(_with_subtype(amd))
        .prompt(dry)
        .endswith("pattern: AMD (dry).<|im_end|>\n<|im_start|>assistant\n")
    )


def _amd_cohort() -> tuple[list[dict[str, float]], list[Label]]:
    """A pattern head that names AMD for raised central IS/OS-RPE and Normal otherwise."""
    rows = [MID | {"isos_rpe_central": 40.0 + i} for i in range(10)] + [
        MID | {"isos_rpe_central": 56.0 + i} for i in range(10)
    ]
    return rows, [Label.NORMAL] * 10 + [Label.AMD] * 10


def _with_subtype(bundle):
    """The bundle's generation config as stage 3 writes it for a `pattern_subtype` preset."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["config"]["generation"]["pattern_subtype"] = True
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return bundle
