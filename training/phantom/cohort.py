"""Phantom cohort generation: plan (labels, splits), render every subject in worker processes, write the manifest.

Every subject's randomness comes from `default_rng([seed, subject_index, ...])`, so the files do not
depend on the number of workers or on the order in which the workers finish: same seed, same bytes.
Each subject is acquired on one device (training.phantom.devices; the manifest's `meta_device`): by
default all on `reference`, which renders exactly what the generator rendered before devices existed.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from training.manifest import MANIFEST_NAME, CohortRecord, write_manifest
from training.phantom.cfp_render import CFP_SIZE, PX_PER_MM, render_cfp
from training.phantom.devices import DEVICES, REFERENCE, apply_cfp, apply_oct, fovea_frame, get_device
from training.phantom.dicom_writer import write_study
from training.phantom.oct_render import AXIAL_UM_PER_PX, LATERAL_UM_PER_PX, OCT_HEIGHT, OCT_WIDTH, render_volume
from training.phantom.sampling import N_FRAMES, EyeTruth, SubjectTruth, sample_subject

SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}  #: the rest is train; stratified by label
SYNTHETIC_NOTICE = (
    "SYNTHETIC PHANTOM COHORT. Every image and number here was rendered by grok-pacs training.phantom from\n"
    "label-conditioned random draws. It is not clinical data, describes no real person, and must never be\n"
    "used to make or support a clinical decision. Format: docs/cohort-manifest.md.\n"
)


@dataclass(frozen=True)
class SubjectPlan:
    index: int
    subject_id: str
    label: Label
    split: str
    device: str = REFERENCE  #: training.phantom.devices name


@dataclass(frozen=True)
class RenderedEye:
    """One eye as a device acquired it: its truth, photograph, B-scans and the foveal B-scan's index."""

    truth: EyeTruth
    cfp: np.ndarray  #: uint8 [H, W, 3]
    volume: np.ndarray  #: uint8 [F, H, W]
    fovea_frame: int


def plan_cohort(n_subjects: int, seed: int) -> list[SubjectPlan]:
    """Balanced labels (round robin, shuffled) and a label-stratified train/val/test split by subject."""
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    rng = np.random.default_rng([seed, 0xC0407])
    labels = [DIAGNOSTIC_LABELS[i % len(DIAGNOSTIC_LABELS)] for i in range(n_subjects)]
    labels = [labels[i] for i in rng.permutation(n_subjects)]
    splits = ["train"] * n_subjects
    for label in DIAGNOSTIC_LABELS:
        members = [i for i, lab in enumerate(labels) if lab == label]
        order = [members[i] for i in rng.permutation(len(members))]
        k = len(order)
        n_val = int(round(k * SPLIT_FRACTIONS["val"])) or (1 if k >= 3 else 0)
        n_test = int(round(k * SPLIT_FRACTIONS["test"])) or (1 if k >= 2 else 0)
        for i in order[:n_test]:
            splits[i] = "test"
        for i in order[n_test : n_test + n_val]:
            splits[i] = "val"
    return [SubjectPlan(i, f"PH{seed}-{i + 1:05d}", labels[i], splits[i]) for i in range(n_subjects)]


def assign_devices(plans: list[SubjectPlan], devices: tuple[str, ...], seed: int) -> list[SubjectPlan]:
    """Each subject's device. Several training devices: in turn over a seeded shuffle (balanced). A held-out
    device only alone, and then every subject is a test subject: its eyes never reach a training split."""
    if not devices:
        raise ValueError("at least one device is needed")
    for name in devices:
        get_device(name)
    held_out = [name for name in devices if DEVICES[name].held_out]
    if held_out and len(devices) > 1:
        raise ValueError(f"held-out device {held_out[0]!r} cannot share a cohort with other devices")
    if held_out:
        return [replace(p, split="test", device=held_out[0]) for p in plans]
    if len(devices) == 1:
        return [replace(p, device=devices[0]) for p in plans]
    order = np.random.default_rng([seed, 0xDE71CE]).permutation(len(plans))
    chosen = {int(i): devices[k % len(devices)] for k, i in enumerate(order)}
    return [replace(p, device=chosen[k]) for k, p in enumerate(plans)]


def render_subject(plan: SubjectPlan, seed: int) -> tuple[SubjectTruth, list[RenderedEye]]:
    """Sample one subject and render both eyes on the plan's device (the reference draws nothing extra)."""
    device = get_device(plan.device)
    truth = sample_subject(plan.subject_id, plan.label, np.random.default_rng([seed, plan.index]))
    eyes = []
    for eye_no, eye in enumerate(truth.eyes):
        cfp = render_cfp(eye.cfp, eye.eye, np.random.default_rng([seed, plan.index, eye_no, 1])).rgb
        volume = render_volume(eye, np.random.default_rng([seed, plan.index, eye_no, 2]), device.oct_frames)
        frame = eye.oct.fovea_frame if device.oct_frames == N_FRAMES else fovea_frame(eye.oct.fovea_y, len(volume))
        if device.name != REFERENCE:
            acquisition = np.random.default_rng([seed, plan.index, eye_no, 3])
            cfp, volume = apply_cfp(device, cfp, acquisition), apply_oct(device, volume, acquisition)
        eyes.append(RenderedEye(eye, cfp, volume, frame))
    return truth, eyes


def _make_subject(job: tuple[Path, int, bool, SubjectPlan]) -> list[CohortRecord]:
    """Sample, render and write one subject (both eyes; DICOM study when asked)."""
    out_dir, seed, dicom, plan = job
    truth, rendered = render_subject(plan, seed)
    subject_dir = out_dir / "subjects" / plan.subject_id
    cfps, octs, records = {}, {}, []
    for view in rendered:
        eye, cfp, volume = view.truth, view.cfp, view.volume
        eye_dir = subject_dir / eye.eye
        (eye_dir / "oct").mkdir(parents=True, exist_ok=True)
        Image.fromarray(cfp).save(eye_dir / "cfp.png", compress_level=1)
        for k in range(volume.shape[0]):
            Image.fromarray(volume[k]).save(eye_dir / "oct" / f"{k:03d}.png", compress_level=1)
        cfps[eye.eye], octs[eye.eye] = cfp, volume
        meta = {"age": str(truth.age), "sex": truth.sex, "subtype": eye.subtype, "device": plan.device}
        records.append(
            CohortRecord(
                plan.subject_id,
                eye.eye,
                plan.label,
                plan.split,
                eye_dir / "cfp.png",
                eye_dir / "oct",
                eye.biomarkers,
                view.fovea_frame,
                None,
                0,
                meta,
            )
        )
    if dicom:
        study = write_study(out_dir / "dicom" / plan.subject_id, truth, seed, cfps, octs, plan.device)
        records = [replace(r, study_dir=study.study_dir) for r in records]
    return records


def generate_cohort(
    out_dir: Path,
    n_subjects: int,
    seed: int,
    *,
    dicom: bool = True,
    dicom_splits: tuple[str, ...] | None = None,
    workers: int = 2,
    progress: bool = True,
    devices: tuple[str, ...] = (REFERENCE,),
) -> Path:
    """Render a phantom cohort under out_dir and return the path of its manifest.csv. With `dicom`, the
    subjects of `dicom_splits` (None: every subject) also get a DICOM study (a sixth of a subject's time).
    `devices`: the acquisition devices the subjects are shared among (assign_devices); one held-out device
    alone renders an all-test evaluation cohort."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    devices = tuple(devices)
    plans = assign_devices(plan_cohort(n_subjects, seed), devices, seed)
    jobs = [(out_dir, seed, dicom and (dicom_splits is None or p.split in dicom_splits), p) for p in plans]
    records: list[CohortRecord] = []
    bar = tqdm(total=n_subjects, desc="phantom subjects", unit="subject", disable=not progress)
    if workers <= 1:
        for job in jobs:
            records.extend(_make_subject(job))
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_make_subject, jobs, chunksize=2):
                records.extend(result)
                bar.update()
    bar.close()
    (out_dir / "README.txt").write_text(SYNTHETIC_NOTICE, encoding="utf-8")
    (out_dir / "cohort.json").write_text(
        json.dumps(_description(n_subjects, seed, dicom, dicom_splits, devices), indent=2) + "\n", encoding="utf-8"
    )
    return write_manifest(out_dir / MANIFEST_NAME, records)


def _description(
    n_subjects: int, seed: int, dicom: bool, dicom_splits: tuple[str, ...] | None, devices: tuple[str, ...]
) -> dict:
    described = {
        "devices": {name: get_device(name).describe() for name in devices},
        "evaluation_only": any(get_device(name).held_out for name in devices),
    }
    return ({} if devices == (REFERENCE,) else described) | {
        "synthetic": True,
        "notice": SYNTHETIC_NOTICE.replace("\n", " ").strip(),
        "generator": "training.phantom",
        "seed": seed,
        "n_subjects": n_subjects,
        "dicom": dicom,
        "dicom_splits": list(dicom_splits) if dicom and dicom_splits is not None else None,
        "cfp": {"size_px": CFP_SIZE, "px_per_mm": round(PX_PER_MM, 4), "field_of_view_deg": 45},
        "oct": {
            "frames": N_FRAMES,
            "width_px": OCT_WIDTH,
            "height_px": OCT_HEIGHT,
            "axial_um_per_px": AXIAL_UM_PER_PX,
            "lateral_um_per_px": round(LATERAL_UM_PER_PX, 4),
            "frame_order": "superior to inferior",
            "fovea_frame": "0-based, per eye in manifest.csv",
        },
    }
