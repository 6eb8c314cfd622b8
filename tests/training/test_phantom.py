"""Phantom cohort: deterministic, anatomy measurably follows the biomarkers, real DICOM, learnable labels."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from tests.conftest import require_tool
from training.manifest import load_manifest
from training.phantom import generate_cohort, plan_cohort
from training.phantom.cfp_render import render_cfp
from training.phantom.oct_render import AXIAL_UM_PER_PX, OCT_WIDTH, render_volume
from training.phantom.sampling import N_FRAMES, SCAN_MM, sample_subject

OP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"


def _eye(label: Label, i: int, eye: int = 0):
    return sample_subject("T", label, np.random.default_rng([77, i, DIAGNOSTIC_LABELS.index(label)])).eyes[eye]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), 3, seed=11, workers=1, progress=False)


def test_same_seed_same_files_whatever_the_workers(cohort: Path, tmp_path: Path) -> None:
    again = generate_cohort(tmp_path / "again", 3, seed=11, workers=2, progress=False)
    first, second = _digest(cohort.parent), _digest(again.parent)
    assert first == second and len(first) > 3 * (2 * (1 + N_FRAMES) + 4)
    other = generate_cohort(tmp_path / "other", 1, seed=12, workers=1, progress=False)
    assert (other.parent / "subjects").is_dir()
    assert _digest(other.parent)["manifest.csv"] != first["manifest.csv"]


def test_manifest_of_a_cohort_loads_and_is_marked_synthetic(cohort: Path) -> None:
    records = load_manifest(cohort)
    assert len(records) == 6 and {r.eye for r in records} == {"R", "L"}
    for r in records:
        assert r.cfp_path.suffix == ".png" and len(list(r.oct_path.glob("*.png"))) == N_FRAMES
        assert r.study_dir is not None and (r.study_dir / f"OPT_{r.eye}.dcm").is_file()
        assert 0 <= r.fovea_frame < N_FRAMES
    assert "not clinical data" in (cohort.parent / "README.txt").read_text()


def test_dicom_studies_only_for_the_splits_asked_for(tmp_path: Path) -> None:
    """The pipeline writes studies for the held-out subjects only (the demo sends one of them)."""
    manifest = generate_cohort(tmp_path / "c", 8, seed=11, dicom_splits=("test",), workers=2, progress=False)
    records = load_manifest(manifest)
    held_out = [r for r in records if r.split == "test"]
    assert held_out and len(held_out) < len(records)
    for r in records:
        if r.split == "test":
            assert r.study_dir is not None and (r.study_dir / f"OPT_{r.eye}.dcm").is_file()
        else:
            assert r.study_dir is None
    assert {p.name for p in (manifest.parent / "dicom").iterdir()} == {r.subject_id for r in held_out}


def test_labels_balanced_and_split_by_subject() -> None:
    plans = plan_cohort(140, seed=3)
    assert plans == plan_cohort(140, seed=3)
    for label in DIAGNOSTIC_LABELS:
        mine = [p for p in plans if p.label == label]
        assert len(mine) == 20
        assert sorted(p.split for p in mine).count("test") == 3 and sorted(p.split for p in mine).count("val") == 3
    assert {p.split for p in plan_cohort(14, seed=1)} == {"train", "test"}


def _thickness_per_column(bscan: np.ndarray) -> np.ndarray:
    """ILM-to-BM thickness (um) per column read off the image: first row brighter than the vitreous from
    the top, last row of the bright RPE band, after a 5-row vertical mean against the speckle."""
    img = bscan.astype(float)
    kernel = np.ones(5) / 5
    img = np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), 0, img)
    out = np.full(img.shape[1], np.nan)
    for j in range(img.shape[1]):
        bright = np.flatnonzero(img[:, j] > 175)
        if len(bright):
            out[j] = (bright.max() - np.argmax(img[:, j] > 100) + 1) * AXIAL_UM_PER_PX
    return out


@pytest.mark.parametrize("label", [Label.NORMAL, Label.GLAUCOMA, Label.ALZHEIMER, Label.DIABETES])
def test_measured_bscan_thickness_matches_its_biomarkers(label: Label) -> None:
    for i in range(2):
        eye = _eye(label, i, eye=i)
        volume = render_volume(eye, np.random.default_rng(i))
        measured = _thickness_per_column(volume[eye.oct.fovea_frame])
        x = -SCAN_MM / 2 + SCAN_MM * (np.arange(OCT_WIDTH) + 0.5) / OCT_WIDTH - eye.oct.fovea_x
        nasal = x if eye.eye == "R" else -x
        rings = {"inner": (0.6, 1.4), "outer": (1.6, 2.9)}
        for ring, (lo, hi) in rings.items():
            for side, sign in (("nasal", 1), ("temporal", -1)):
                cols = (sign * nasal > lo) & (sign * nasal < hi)
                truth = eye.biomarkers[f"mt_{ring}_{side}"]
                assert np.nanmean(measured[cols]) == pytest.approx(truth, rel=0.04), (label, ring, side)


def test_foveal_pit_is_on_the_recorded_frame() -> None:
    for i, label in enumerate((Label.NORMAL, Label.GLAUCOMA, Label.HYPERTENSION)):
        eye = _eye(label, i)
        volume = render_volume(eye, np.random.default_rng(0))
        centre = int((eye.oct.fovea_x + SCAN_MM / 2) / SCAN_MM * OCT_WIDTH)
        depth = [np.nanmin(_thickness_per_column(frame)[centre - 4 : centre + 5]) for frame in volume]
        assert int(np.argmin(depth)) == eye.oct.fovea_frame


def test_cup_area_is_ordered_like_cup_to_disc() -> None:
    base = _eye(Label.NORMAL, 0).cfp
    areas = []
    for cdr in (0.25, 0.45, 0.65, 0.85):
        params = replace(base, values={**base.values, "cup_to_disc": cdr})
        out = render_cfp(params, "R", np.random.default_rng(5))
        x, y = out.disc_center
        patch = out.rgb[
            int(y - out.disc_radius) : int(y + out.disc_radius), int(x - out.disc_radius) : int(x + out.disc_radius)
        ]
        areas.append(int(((patch[..., 1] > 205) & (patch[..., 2] > 165)).sum()))  # the pale cup
    assert areas == sorted(areas) and areas[0] > 0
    ratio = np.sqrt(areas[-1] / areas[1])  # cup diameter ~ cup-to-disc
    assert ratio == pytest.approx(0.85 / 0.45, rel=0.2)


def _box_dimension(mask: np.ndarray) -> float:
    sizes, counts = [2, 4, 8, 16, 32], []
    for s in sizes:
        h, w = (mask.shape[0] // s) * s, (mask.shape[1] // s) * s
        blocks = mask[:h, :w].reshape(h // s, s, w // s, s).any(axis=(1, 3))
        counts.append(blocks.sum())
    return float(-np.polyfit(np.log(sizes), np.log(counts), 1)[0])


def test_vessels_follow_avr_and_fractal_dimension() -> None:
    base = _eye(Label.NORMAL, 1).cfp
    ratios, dims = [], []
    for avr in (0.5, 0.7, 0.9):
        out = render_cfp(replace(base, values={**base.values, "avr": avr}), "L", np.random.default_rng(2))
        ratios.append(out.artery_mask.sum() / out.vein_mask.sum())
    for fd in (1.30, 1.38, 1.46):
        values = {**base.values, "fd_arterial": fd, "fd_venular": fd}
        out = render_cfp(replace(base, values=values), "R", np.random.default_rng(3))
        dims.append(_box_dimension((out.artery_mask + out.vein_mask) > 0.5))
    assert ratios == sorted(ratios) and ratios[-1] / ratios[0] > 1.4
    assert dims == sorted(dims) and dims[-1] - dims[0] > 0.05


def test_label_signatures_follow_spec_directions() -> None:
    means = {}
    for label in DIAGNOSTIC_LABELS:
        rows = [_eye(label, i).biomarkers for i in range(12)]
        means[label] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    normal = means[Label.NORMAL]
    assert (
        means[Label.GLAUCOMA]["cup_to_disc"]
        > 0.6
        > 0.45
        > max(means[lab]["cup_to_disc"] for lab in DIAGNOSTIC_LABELS if lab != Label.GLAUCOMA)
    )
    assert means[Label.GLAUCOMA]["rnfl_average"] < 0.7 * normal["rnfl_average"]
    assert means[Label.AMD]["rpe_average"] > 1.2 * normal["rpe_average"]
    assert means[Label.DIABETIC_RETINOPATHY]["mt_central"] > normal["mt_central"] + 15
    assert min(means, key=lambda lab: means[lab]["avr"]) == Label.HYPERTENSION
    assert max(means, key=lambda lab: means[lab]["tortuosity_arterial"]) == Label.HYPERTENSION
    assert min(means, key=lambda lab: means[lab]["fd_arterial"]) == Label.ALZHEIMER
    assert means[Label.DIABETES]["inl_average"] < normal["inl_average"] - 2
    assert means[Label.DIABETES]["tortuosity_venular"] > normal["tortuosity_venular"] + 0.05


def test_normal_eyes_fall_in_the_schemas_normal_ranges() -> None:
    inside = total = 0
    for i in range(10):
        values = _eye(Label.NORMAL, i, eye=i % 2).biomarkers
        for b in BIOMARKERS:
            total += 1
            inside += b.normal[0] <= values[b.key] <= b.normal[1]
    assert inside / total > 0.85, inside / total


def test_dicom_study_is_readable_and_dcmdump_accepts_it(cohort: Path) -> None:
    dcmdump, dciodvfy = require_tool("dcmdump"), require_tool("dciodvfy")
    record = load_manifest(cohort)[0]
    files = sorted(record.study_dir.glob("*.dcm"))
    assert [f.name for f in files] == ["OPT_L.dcm", "OPT_R.dcm", "OP_L.dcm", "OP_R.dcm"]
    datasets = [pydicom.dcmread(f) for f in files]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1 and len({ds.SOPInstanceUID for ds in datasets}) == 4
    for f, ds in zip(files, datasets):
        assert ds.ImageLaterality == f.stem[-1] and ds.PatientName.family_name == "PHANTOM"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        run = subprocess.run([dcmdump, "+M", str(f)], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0 and "E: " not in run.stderr, run.stderr
    opt = next(ds for f, ds in zip(files, datasets) if f.name == f"OPT_{record.eye}.dcm")
    assert opt.SOPClassUID == OPT and opt.pixel_array.shape == (N_FRAMES, 256, 256)
    png = np.asarray(Image.open(record.oct_path / f"{record.fovea_frame:03d}.png"))
    assert np.abs(opt.pixel_array[record.fovea_frame].astype(int) - png).mean() < 6  # same B-scan, JPEG q92
    op = next(ds for f, ds in zip(files, datasets) if f.name == f"OP_{record.eye}.dcm")
    assert op.SOPClassUID == OP and op.pixel_array.shape == (448, 448, 3)
    check = subprocess.run([dciodvfy, str(files[2])], capture_output=True, text=True, timeout=30)
    assert "Error" not in check.stderr + check.stdout


def test_cli_help_explains() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "training.phantom", "--help"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and "SYNTHETIC" in run.stdout and "--subjects" in run.stdout
