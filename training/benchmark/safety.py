"""Benchmark metrics of the safety gate, dispositions and calibration (issue 15), and degraded phantom eyes.

- `auroc`, `sensitivity_at_specificity`: ungradable detection, scored by `quality.quality_margin` (negated).
- `referral_metrics`: refer (urgent referral, referral, retake) vs not (rescreen), sensitivity and specificity.
- ECE before and after calibration: `training.calibration.expected_calibration_error`.
- `DEGRADATIONS`: what real captures go wrong with (blur, under- and over-exposure, small-pupil vignetting,
  off-centre field, motion blur, OCT low signal, eye motion between B-scans, blank frames), applied to
  phantom renders; `gate_benchmark` scores clean and degraded images and counts degraded eyes the gate would
  still let through to a diagnosis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from grok_pacs.analysis.quality import QualityThresholds, assess_cfp, assess_oct, quality_margin
from grok_pacs.analysis.result import Action, Gradability

REFER_ACTIONS = (Action.URGENT_REFERRAL, Action.REFERRAL, Action.RETAKE)


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); ValueError without both classes."""
    s, y = np.asarray(scores, np.float64), np.asarray(positives, bool)
    if y.all() or not y.any():
        raise ValueError("AUROC needs positive and negative cases")
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def sensitivity_at_specificity(
    scores: Sequence[float], positives: Sequence[bool], specificity: float = 0.95
) -> tuple[float, float]:
    """(sensitivity, threshold) at the lowest threshold whose specificity is >= `specificity` (score >= t =
    positive)."""
    s, y = np.asarray(scores, np.float64), np.asarray(positives, bool)
    best = (0.0, float("inf"))
    for t in np.unique(s):
        predicted = s >= t
        spec = float((~predicted[~y]).mean()) if (~y).any() else 1.0
        if spec >= specificity:
            sens = float(predicted[y].mean()) if y.any() else 0.0
            if sens > best[0] or (sens == best[0] and t < best[1]):
                best = (sens, float(t))
    return best


def referral_metrics(predicted: Sequence[Action], truth_refer: Sequence[bool]) -> dict[str, float]:
    """Sensitivity and specificity of 'refer' (urgent referral, referral, retake) against the truth."""
    refer = np.array([a in REFER_ACTIONS for a in predicted])
    truth = np.asarray(truth_refer, bool)
    return {
        "sensitivity": float(refer[truth].mean()) if truth.any() else float("nan"),
        "specificity": float((~refer[~truth]).mean()) if (~truth).any() else float("nan"),
        "n_refer": int(truth.sum()),
        "n_not": int((~truth).sum()),
    }


# --- degradations -----------------------------------------------------------------------------------
def _blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(5, 12) * min(rgb.shape[:2]) / 512
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))


def _scale(rgb: np.ndarray, factor: float, offset: float = 0.0) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) * factor + offset, 0, 255).astype(np.uint8)


def _vignette(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small pupil: light only within a small disc around the centre."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    keep = np.hypot(yy - h / 2, xx - w / 2) < rng.uniform(0.12, 0.22) * min(h, w)
    return (rgb * keep[..., None]).astype(np.uint8)


def _off_centre(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shift = int(rng.uniform(0.45, 0.6) * rgb.shape[1])
    out = np.zeros_like(rgb)
    out[:, shift:] = rgb[:, : rgb.shape[1] - shift]
    return out


def _motion_blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The camera or the eye moved during the exposure: the image smeared along one of four directions."""
    dy, dx = ((0, 1), (1, 0), (1, 1), (1, -1))[int(rng.integers(4))]
    length = max(2, int(rng.uniform(0.03, 0.06) * min(rgb.shape[:2])))
    acc = np.zeros(rgb.shape, np.float32)
    for step in range(length):
        acc += np.roll(rgb, (step * dy, step * dx), axis=(0, 1))
    return (acc / length).astype(np.uint8)


def _eye_motion(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saccades during the scan: a quarter of the B-scans moved up or down by 10-20 % of their height."""
    out = vol.copy()
    for frame in rng.choice(vol.shape[0], size=max(1, vol.shape[0] // 4), replace=False):
        shift = max(1, int(rng.uniform(0.1, 0.2) * vol.shape[1])) * int(rng.choice([-1, 1]))
        out[frame] = np.roll(vol[frame], shift, axis=0)  # the rows rolled round are blanked below
        if shift > 0:
            out[frame, :shift] = 0
        else:
            out[frame, shift:] = 0
    return out


CFP_DEGRADATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "blur": _blur,
    "underexposed": lambda rgb, rng: _scale(rgb, rng.uniform(0.05, 0.2)),
    "overexposed": lambda rgb, rng: np.where(rgb.max(-1, keepdims=True) > 20, _scale(rgb, 0.2, 235), rgb),
    "small-pupil": _vignette,
    "off-centre": _off_centre,
    "motion": _motion_blur,
    "blank": lambda rgb, rng: np.zeros_like(rgb),
}
OCT_DEGRADATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "low-signal": lambda vol, rng: np.clip(
        vol.astype(np.float32) * rng.uniform(0.05, 0.15) + rng.normal(0, 2, vol.shape), 0, 255
    ).astype(np.uint8),
    "motion": _eye_motion,
    "blank": lambda vol, rng: np.zeros_like(vol),
}


def phantom_eyes(n_eyes: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(CFP, OCT volume) of `n_eyes` phantom eyes, labels in turn (fixed seed)."""
    from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
    from training.phantom.cfp_render import render_cfp
    from training.phantom.oct_render import render_volume
    from training.phantom.sampling import sample_subject

    eyes = []
    for i in range((n_eyes + 1) // 2):
        truth = sample_subject(
            f"GATE{i}", DIAGNOSTIC_LABELS[i % len(DIAGNOSTIC_LABELS)], np.random.default_rng([seed, i])
        )
        for k, eye in enumerate(truth.eyes):
            eyes.append(
                (
                    render_cfp(eye.cfp, eye.eye, np.random.default_rng([seed, i, k, 1])).rgb,
                    render_volume(eye, np.random.default_rng([seed, i, k, 2])),
                )
            )
    return eyes[:n_eyes]


def gate_benchmark(
    eyes: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0, limits: QualityThresholds | None = None
) -> dict:
    """Each (cfp, oct volume) eye once clean and once degraded (degradations in turn): detection figures."""
    limits = limits or QualityThresholds()
    rng = np.random.default_rng(seed)
    cfp_names, oct_names = list(CFP_DEGRADATIONS), list(OCT_DEGRADATIONS)
    rows = {"CFP": [], "OCT": []}  # (score, degraded, degradation, gradable)
    passed_degraded_eyes = 0
    for i, (cfp, volume) in enumerate(eyes):
        c_name, o_name = cfp_names[i % len(cfp_names)], oct_names[i % len(oct_names)]
        for modality, image, name, assess, degrade in (
            ("CFP", cfp, c_name, assess_cfp, CFP_DEGRADATIONS),
            ("OCT", volume, o_name, assess_oct, OCT_DEGRADATIONS),
        ):
            for degraded, pixels in ((False, image), (True, degrade[name](image, rng))):
                verdict = assess(pixels, limits)
                rows[modality].append(
                    (
                        -quality_margin(verdict, limits),
                        degraded,
                        name if degraded else "clean",
                        verdict.gradability is Gradability.GRADABLE,
                    )
                )
        # The degraded eye (both modalities degraded) gets a diagnosis if either modality passes.
        passed_degraded_eyes += int(rows["CFP"][-1][3] or rows["OCT"][-1][3])
    out: dict = {
        "eyes": len(eyes),
        "degraded_eyes_with_a_diagnosis": passed_degraded_eyes,
        "not_covered": [],
    }
    for modality, items in rows.items():
        scores, positives = [r[0] for r in items], [r[1] for r in items]
        sens, threshold = sensitivity_at_specificity(scores, positives, 0.95)
        per_kind = {}
        for _, _degraded, kind, gradable in items:
            hit = per_kind.setdefault(kind, [0, 0])
            hit[0] += int(not gradable)
            hit[1] += 1
        out[modality] = {
            "auroc": auroc(scores, positives),
            "sensitivity_at_95_specificity": sens,
            "gate_sensitivity": float(np.mean([not r[3] for r in items if r[1]])),
            "gate_specificity": float(np.mean([r[3] for r in items if not r[1]])),
            "flagged_ungradable_by_kind": {k: f"{v[0]}/{v[1]}" for k, v in per_kind.items()},
        }
    return out


# --- wiring for bench/phantom.py (held-out eyes through the runtime) ----------------------------------
def truth_dispositions(reports: Sequence, truth_labels: Sequence[str], truth_biomarkers: Sequence[dict]) -> list:
    """The disposition each eye should get: the runtime's table applied to its true label and biomarkers."""
    import dataclasses

    from grok_pacs.analysis.result import BiomarkerEstimate
    from grok_pacs.domain.biomarkers import BY_KEY
    from grok_pacs.domain.labels import Label
    from grok_pacs.report.dispositions import for_eye

    out = []
    for report, label, values in zip(reports, truth_labels, truth_biomarkers, strict=True):
        markers = tuple(BiomarkerEstimate(k, float(v), BY_KEY[k].unit) for k, v in values.items() if v == v)
        truth = dataclasses.replace(
            report, label=Label(label), biomarkers=markers, gradability=Gradability.GRADABLE, narrative="", quality=()
        )
        out.append(for_eye(truth))
    return out


def referral_figures(reports: Sequence, truth_labels: Sequence[str], truth_biomarkers: Sequence[dict]) -> dict:
    """Referral sensitivity/specificity of the served reports' dispositions against the truth's, plus the
    number of not-gradable eyes that carry a diagnosis (must be 0)."""
    from grok_pacs.report.dispositions import for_eye

    predicted = [(r.disposition or for_eye(r)).action for r in reports]
    truth = [d.action in REFER_ACTIONS for d in truth_dispositions(reports, truth_labels, truth_biomarkers)]
    figures = referral_metrics(predicted, truth)
    figures["ungradable_with_diagnosis"] = sum(
        1 for r in reports if r.gradability is not Gradability.GRADABLE and r.diagnosed
    )
    return figures


def calibration_figures(
    val_scores: Sequence[dict], val_labels: Sequence[str], test_scores: Sequence[dict], test_labels: Sequence[str]
) -> dict:
    """Calibration fitted on the validation eyes; ECE of the held-out eyes before and after it."""
    from training.calibration import calibrate, ece_interval, expected_calibration_error

    cal = calibrate(val_scores, val_labels, "validation eyes")
    calibrated = [cal.apply(s) for s in test_scores]
    return {
        "method": cal.method,
        "temperature": cal.temperature,
        "uniform": cal.uniform,
        "n_val": len(val_labels),
        "n_test": len(test_labels),
        "ece_before": expected_calibration_error(test_scores, test_labels),
        "ece_after": expected_calibration_error(calibrated, test_labels),
        "ece_after_ci95": ece_interval(calibrated, test_labels),
    }
