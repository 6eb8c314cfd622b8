"""The gradability gate (grok_pacs.analysis.quality) on inputs the tests make: blank, tiny, blurred,
motion-smeared, corrupted and badly exposed images fail it with coded reasons; phantom renders, the tests' fundus and a
fundus photograph made by DCMTK img2dcm pass it; SRs of eyes that fail it carry no diagnosis and pass
dciodvfy."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFilter

from devtools import sample_dicom
from grok_pacs.analysis.imaging import ImageReadError, read_cfp
from grok_pacs.analysis.quality import QualityThresholds, assess_cfp, assess_oct, check_header, judge, ungradable_report
from grok_pacs.analysis.result import Eye, Gradability, SourceImage
from grok_pacs.config import load_settings
from grok_pacs.report.sr import SRKey, build_sr
from tests.conftest import require_tool
from tests.helpers.ophthalmic_dicom import Patient, fundus_pixels, make_cfp, make_oct, oct_pixels, write
from tests.helpers.srcheck import assert_valid_sr

LIMITS = QualityThresholds()


def drawn_fundus(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A fundus-like photograph drawn here: dark frame, round orange field, bright disc, vessels, sensor noise."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    side = min(width, height) - 20
    left, top = (width - side) // 2, (height - side) // 2
    draw.ellipse((left, top, left + side, top + side), fill=(190, 80, 30))
    cx, cy = left + side * 0.7, top + side * 0.5
    for angle in np.linspace(0, 2 * np.pi, 9)[:-1]:
        draw.line(
            (cx, cy, cx + np.cos(angle) * side * 0.6, cy + np.sin(angle) * side * 0.6), fill=(120, 30, 20), width=3
        )
    draw.ellipse((cx - 22, cy - 25, cx + 22, cy + 25), fill=(240, 210, 150))
    noisy = np.asarray(image, np.float32) + np.random.default_rng(seed).normal(0, 6, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def codes_of(verdict) -> set[str]:
    return {r.code for r in verdict.reasons}


def blurred(rgb: np.ndarray, sigma_at_512: float) -> np.ndarray:
    radius = sigma_at_512 * min(rgb.shape[:2]) / 512
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))


def corrupted_jpeg(rgb: np.ndarray, seed: int = 0) -> bytes:
    """A JPEG whose entropy-coded data has 4 KB overwritten a third of the way in (markers left intact)."""
    data = bytearray(sample_dicom.jpeg_bytes(rgb))
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    at = start + (len(data) - start) // 3
    data[at : at + 4096] = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return bytes(data)


# --- images that pass ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image",
    [fundus_pixels(), drawn_fundus(), sample_dicom.fundus_rgb(1024, "L")],
    ids=["tests-fundus", "drawn-640x480", "devtools-1024"],
)
def test_good_fundus_images_are_gradable(image):
    verdict = assess_cfp(image, LIMITS)
    assert verdict.gradability is Gradability.GRADABLE, verdict.reasons


def test_phantom_renders_pass_the_gate():
    """The demo's and benchmark's phantom images must stay gradable (else the demo gives no diagnosis)."""
    from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
    from training.phantom.cfp_render import render_cfp
    from training.phantom.oct_render import render_volume
    from training.phantom.sampling import sample_subject

    for i, label in enumerate(DIAGNOSTIC_LABELS):
        truth = sample_subject(f"G{i}", label, np.random.default_rng([3, i]))
        eye = truth.eyes[0]
        cfp = render_cfp(eye.cfp, eye.eye, np.random.default_rng([3, i, 1])).rgb
        volume = render_volume(eye, np.random.default_rng([3, i, 2]))
        assert assess_cfp(cfp, LIMITS).gradability is Gradability.GRADABLE, label
        assert assess_oct(volume, LIMITS).gradability is Gradability.GRADABLE, label


def test_img2dcm_ophthalmic_photograph_passes_indication_and_quality(tmp_path):
    jpeg = tmp_path / "fundus.jpg"
    Image.fromarray(drawn_fundus()).save(jpeg, quality=92)
    out = tmp_path / "fundus.dcm"
    device = "(0022,0015)[0]"
    proc = subprocess.run(
        [
            require_tool("img2dcm"),
            "-oph",
            "-k",
            "ImageLaterality=L",
            "-k",
            f"{device}.(0008,0100)=409898007",
            "-k",
            f"{device}.(0008,0102)=SCT",
            "-k",
            f"{device}.(0008,0104)=Fundus camera",
            str(jpeg),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    header = pydicom.dcmread(out, stop_before_pixels=True)
    assert header.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.5.1" and header.Modality == "OP"
    assert check_header("CFP", header, LIMITS) == []
    verdict = judge("CFP", header, read_cfp(out), None, header.SOPInstanceUID, LIMITS)
    assert verdict.gradability is Gradability.GRADABLE, verdict.reasons


# --- images that fail ------------------------------------------------------------------------------
def test_blank_and_tiny_cfp_are_ungradable_with_reasons():
    assert {"field-coverage", "underexposed"} <= codes_of(assess_cfp(np.zeros((512, 512, 3), np.uint8), LIMITS))
    tiny = assess_cfp(np.zeros((8, 8, 3), np.uint8), LIMITS)
    assert tiny.gradability is Gradability.UNGRADABLE and "resolution" in codes_of(tiny)


@pytest.mark.parametrize("sigma", [8, 16])
def test_heavily_blurred_fundus_is_out_of_focus(sigma):
    for image in (fundus_pixels(), drawn_fundus()):
        verdict = assess_cfp(blurred(image, sigma), LIMITS)
        assert verdict.gradability is Gradability.UNGRADABLE and codes_of(verdict) == {"blur"}, verdict.reasons


def test_over_and_under_exposed_and_off_centre_fundus():
    image = drawn_fundus().astype(np.float32)
    assert "underexposed" in codes_of(assess_cfp((image * 0.15).astype(np.uint8), LIMITS))
    blown = image.copy()
    lit = image.max(axis=-1) > 40
    blown[lit] = np.clip(image[lit] * 0.2 + 235, 0, 255)  # the field washed out to near white
    assert "overexposed" in codes_of(assess_cfp(blown.astype(np.uint8), LIMITS))
    shifted = np.zeros_like(image)
    shifted[:, 300:] = image[:, :340]
    assert "off-centre" in codes_of(assess_cfp(shifted.astype(np.uint8), LIMITS))


def test_corrupted_jpeg_is_refused_strictly_and_its_fill_is_detected(tmp_path):
    rgb = fundus_pixels(size=768)
    broken = corrupted_jpeg(rgb)
    ds = make_cfp(Patient(), "R")
    ds.Rows, ds.Columns = rgb.shape[:2]
    path = write(sample_dicom.set_jpeg_frame(ds, broken), tmp_path / "broken.dcm")
    with pytest.raises(ImageReadError, match="JPEG frame 1 is corrupt"):
        read_cfp(path)
    # What pydicom's lenient decoder makes of it (a repeated fill) fails the pixel measures too.
    filled = pydicom.dcmread(path).pixel_array
    assert "decoder-fill" in codes_of(assess_cfp(filled, LIMITS))


def test_oct_blank_tiny_zero_16bit_and_low_signal():
    assert assess_oct(oct_pixels(), LIMITS).gradability is Gradability.GRADABLE
    tiny = assess_oct(np.zeros((4, 8, 8), np.uint8), LIMITS)
    assert {"resolution", "blank-frames", "low-signal"} <= codes_of(tiny)
    zero16 = make_oct(Patient(), "R", volume=np.zeros((6, 96, 96), np.uint8))
    zero16.BitsAllocated = zero16.BitsStored = 16
    zero16.HighBit = 15
    verdict = assess_oct(np.zeros((6, 96, 96), np.float32), LIMITS, zero16, zero16.SOPInstanceUID)
    assert verdict.gradability is Gradability.UNGRADABLE and "blank-frames" in codes_of(verdict)
    faint = (oct_pixels() * 0.08).astype(np.uint8)
    assert "low-signal" in codes_of(assess_oct(faint, LIMITS))


def test_motion_blurred_fundus_and_moved_oct_b_scans_are_ungradable_for_motion():
    """A fundus smeared along one direction (camera or eye moved during the exposure), and an OCT volume
    whose B-scans jump up and down (saccades during the scan), fail with reason `motion`."""
    sharp = drawn_fundus()
    smeared = np.mean([np.roll(sharp, step, axis=1) for step in range(24)], axis=0).astype(np.uint8)
    assert "motion" not in codes_of(assess_cfp(sharp, LIMITS))
    verdict = assess_cfp(smeared, LIMITS)
    assert verdict.gradability is Gradability.UNGRADABLE and "motion" in codes_of(verdict), verdict.reasons
    still = oct_pixels()
    moved = still.copy()
    moved[2] = np.roll(still[2], still.shape[1] // 6, axis=0)
    assert "motion" not in codes_of(assess_oct(still, LIMITS))
    verdict = assess_oct(moved, LIMITS)
    assert verdict.gradability is Gradability.UNGRADABLE and "motion" in codes_of(verdict), verdict.reasons
    assert "axial jump" in next(r.detail for r in verdict.reasons if r.code == "motion")


def test_gate_verdicts_are_counted_in_metrics():
    from grok_pacs.ops.metrics import REGISTRY

    def count(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    ds = make_cfp(Patient(), "R")
    before = (
        count("grok_pacs_gate_verdicts_total", modality="CFP", gradability="ungradable"),
        count("grok_pacs_gate_reasons_total", reason="undecodable"),
    )
    judge("CFP", ds, None, "broken", ds.SOPInstanceUID, LIMITS)
    assert count("grok_pacs_gate_verdicts_total", modality="CFP", gradability="ungradable") == before[0] + 1
    assert count("grok_pacs_gate_reasons_total", reason="undecodable") == before[1] + 1


def test_header_out_of_scope_wrong_modality_laterality_photometric():
    ds = make_cfp(Patient(), "R")
    ds.Modality, ds.ImageLaterality = "OPT", "B"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    assert {"sop-class-modality", "laterality", "photometric"} <= {r.code for r in check_header("CFP", ds, LIMITS)}
    verdict = judge("CFP", ds, fundus_pixels(), None, ds.SOPInstanceUID, LIMITS)
    assert verdict.gradability is Gradability.OUT_OF_SCOPE


def test_thresholds_come_from_settings_and_are_validated(tmp_path):
    settings = load_settings(data_dir=tmp_path, gate_min_sharpness=0.5)
    limits = QualityThresholds.from_settings(settings)
    assert limits.min_sharpness == 0.5
    assert codes_of(assess_cfp(fundus_pixels(), limits)) == {"blur"}  # its sharpness 0.35 < 0.5
    with pytest.raises(ValueError, match="gate_min_exposure"):
        QualityThresholds(min_exposure=0.9, max_exposure=0.5)


def test_ungradable_sr_has_no_diagnosis_and_passes_dciodvfy(tmp_path):
    patient = Patient()
    ds = make_cfp(patient, "R")
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()
    verdict = judge("CFP", ds, np.zeros((ds.Rows, ds.Columns, 3), np.uint8), None, ds.SOPInstanceUID, LIMITS)
    source = SourceImage(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID)
    report = ungradable_report(Eye.RIGHT, (verdict,), (source,), "tiny", "0.1.0")
    assert not report.diagnosed and report.narrative == ""
    from grok_pacs.report import dispositions

    (report,) = dispositions.apply([report])
    sr = build_sr(report, [ds], SRKey(patient.study_uid, 1, "0.1.0", Eye.RIGHT))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    text = assert_valid_sr(
        path,
        "Ungradable: image quality insufficient",
        "Insufficient retinal field coverage",
        "Image quality insufficient: retake, or refer",
        "no diagnosis was made",
    )
    assert "Diagnosis" not in text and "Glaucoma" not in text
    with pytest.raises(ValueError, match="no diagnosis"):
        import dataclasses

        from grok_pacs.domain.labels import Label

        dataclasses.replace(report, label=Label.GLAUCOMA)
