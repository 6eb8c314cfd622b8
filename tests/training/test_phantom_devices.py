"""Acquisition devices of the phantom: they change the images as a camera or OCT would, deterministically;
the reference device renders what the generator always rendered; a held-out device never reaches a training
split; stage 2's acquisition augmentation changes the images and leaves the targets alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydicom
import pytest
import torch

from grok_pacs.analysis.preprocess import preprocess_cfp, preprocess_oct
from training.manifest import load_manifest
from training.phantom import generate_cohort
from training.phantom.__main__ import main as phantom_cli
from training.phantom.cfp_render import render_cfp
from training.phantom.cohort import assign_devices, plan_cohort, render_subject
from training.phantom.devices import DEVICES, HELD_OUT_DEVICES, REFERENCE, TRAINING_DEVICES, get_device
from training.phantom.oct_render import render_volume
from training.phantom.sampling import sample_subject
from training.stage2.config import Stage2Config
from training.stage2.data import augment_acquisition

HELD_OUT = HELD_OUT_DEVICES[0]


def _plan(device: str = REFERENCE):
    return replace(plan_cohort(7, seed=5)[3], device=device)


def _inside(cfp: np.ndarray) -> np.ndarray:
    return cfp.astype(float).sum(-1) > 40  # the field stop's black border left out


def test_reference_device_renders_todays_images_byte_for_byte() -> None:
    plan = _plan()
    truth = sample_subject(plan.subject_id, plan.label, np.random.default_rng([5, plan.index]))
    _, eyes = render_subject(plan, seed=5)
    for k, eye in enumerate(truth.eyes):
        assert np.array_equal(
            eyes[k].cfp, render_cfp(eye.cfp, eye.eye, np.random.default_rng([5, plan.index, k, 1])).rgb
        )
        assert np.array_equal(eyes[k].volume, render_volume(eye, np.random.default_rng([5, plan.index, k, 2])))
        assert eyes[k].fovea_frame == eye.oct.fovea_frame


def test_held_out_device_is_darker_warmer_softer_noisier_and_deterministic() -> None:
    _, ref = render_subject(_plan(), seed=5)
    _, shifted = render_subject(_plan(HELD_OUT), seed=5)
    _, again = render_subject(_plan(HELD_OUT), seed=5)
    assert all(np.array_equal(a.cfp, b.cfp) and np.array_equal(a.volume, b.volume) for a, b in zip(shifted, again))
    a, b = ref[0].cfp.astype(float), shifted[0].cfp.astype(float)
    inside = _inside(ref[0].cfp)
    assert b[inside].mean() < 0.9 * a[inside].mean()  # darker
    red_over_blue = [x[inside][:, 0].mean() / x[inside][:, 2].mean() for x in (a, b)]
    assert red_over_blue[1] > 1.1 * red_over_blue[0]  # warmer
    sharp = np.abs(np.diff(a, axis=1))[inside[:, 1:]].mean()
    assert np.abs(np.diff(b, axis=1))[inside[:, 1:]].mean() < 0.7 * sharp  # softer
    device = get_device(HELD_OUT)
    assert shifted[0].volume.shape[0] == device.oct_frames != ref[0].volume.shape[0]  # wider B-scan spacing
    frame = shifted[0].volume[shifted[0].fovea_frame].astype(float)
    ref_frame = ref[0].volume[ref[0].fovea_frame].astype(float)
    assert np.abs(np.diff(frame[200:], axis=1)).mean() > np.abs(np.diff(ref_frame[200:], axis=1)).mean()  # noisier
    # the same eye: the anatomy is the same, only the acquisition differs
    assert np.corrcoef(preprocess_oct(frame).ravel(), preprocess_oct(ref_frame).ravel())[0, 1] > 0.8
    assert np.corrcoef(preprocess_cfp(ref[0].cfp).ravel(), preprocess_cfp(shifted[0].cfp).ravel())[0, 1] > 0.8


def test_every_device_changes_the_images_and_the_training_devices_share_a_cohort(tmp_path) -> None:
    _, ref = render_subject(_plan(), seed=5)
    for name in DEVICES:
        if name != REFERENCE:
            _, eyes = render_subject(_plan(name), seed=5)
            assert not np.array_equal(eyes[0].cfp, ref[0].cfp)
    plans = assign_devices(plan_cohort(12, seed=3), TRAINING_DEVICES, seed=3)
    assert {p.device for p in plans} == set(TRAINING_DEVICES)
    assert [p.split for p in plans] == [p.split for p in plan_cohort(12, seed=3)]  # devices never move a split
    manifest = generate_cohort(tmp_path / "c", 2, seed=3, workers=1, progress=False, devices=("site-c",))
    records = load_manifest(manifest)
    assert {r.meta["device"] for r in records} == {"site-c"}
    frames = get_device("site-c").oct_frames
    assert all(len(list(r.oct_path.glob("*.png"))) == frames for r in records)
    opt = pydicom.dcmread(records[0].study_dir / f"OPT_{records[0].eye}.dcm", stop_before_pixels=True)
    assert opt.NumberOfFrames == frames and opt.ManufacturerModelName == "training.phantom site-c"


def test_held_out_device_never_reaches_a_training_split(tmp_path) -> None:
    with pytest.raises(ValueError, match="held-out"):
        assign_devices(plan_cohort(12, seed=3), (REFERENCE, HELD_OUT), seed=3)
    assert all(p.split == "test" for p in assign_devices(plan_cohort(30, seed=3), (HELD_OUT,), seed=3))
    assert (
        phantom_cli(
            ["--out", str(tmp_path / "x"), "--subjects", "2", "--no-dicom", "--workers", "1", "--device", HELD_OUT]
        )
        == 0
    )
    records = load_manifest(tmp_path / "x" / "manifest.csv")
    assert {r.split for r in records} == {"test"} and {r.meta["device"] for r in records} == {HELD_OUT}
    with pytest.raises(SystemExit):
        phantom_cli(["--out", str(tmp_path / "y"), "--subjects", "2", "--device", "no-such-camera"])


@pytest.mark.parametrize("modality", ["CFP", "OCT"])
def test_acquisition_augmentation_changes_images_and_keeps_their_content(modality) -> None:
    _, eyes = render_subject(_plan(), seed=5)
    image = preprocess_cfp(eyes[0].cfp) if modality == "CFP" else preprocess_oct(eyes[0].volume[eyes[0].fovea_frame])
    batch = torch.from_numpy(np.stack([image] * 8))
    out = augment_acquisition(batch, torch.Generator().manual_seed(1), modality)
    same = augment_acquisition(batch, torch.Generator().manual_seed(1), modality)
    assert out.shape == batch.shape and out.dtype == batch.dtype and torch.equal(out, same)
    assert all(not torch.allclose(out[i], batch[i], atol=0.02) for i in range(8))
    assert len({round(float(out[i].mean()), 3) for i in range(8)}) == 8  # drawn per image
    for i in range(8):  # the eye is still the eye: the picture correlates with the original
        assert np.corrcoef(out[i].ravel().numpy(), batch[i].ravel().numpy())[0, 1] > 0.8
    if modality == "OCT":  # grey stays grey: no colour cast on B-scans
        assert torch.allclose(out[:, 0] * 0.229 + 0.485, out[:, 2] * 0.225 + 0.406, atol=1e-4)


def test_acquisition_augmentation_is_a_saved_stage2_setting() -> None:
    assert Stage2Config.paper().augment_acquisition and not Stage2Config.small().augment_acquisition
    assert Stage2Config.from_dict(Stage2Config.paper().to_dict()).augment_acquisition
