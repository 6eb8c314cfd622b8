"""Acquisition devices: how one fundus camera and OCT differ from another, applied to a phantom eye at render time.

A `Device` is a fundus camera and an OCT as a site has them: exposure, colour cast and gamma, optical blur,
sensor resolution (the photograph is resampled through the sensor's pixel count and back, so its geometry
and the manifest's pixel spacing stay those of the phantom), sensor noise and JPEG compression of the
photograph; gain, extra speckle, noise and blur of the B-scans and the B-scan spacing (frames per 6 mm
cube). `reference` changes nothing: a cohort rendered on it is byte for byte the cohort of before devices
existed. `TRAINING_DEVICES` may make up a training cohort; `HELD_OUT_DEVICES` never may (generate_cohort
renders a cohort on one only as an all-test evaluation cohort), so a benchmark on them measures eyes from a
device no model has seen. The held-out device is what issue 32 describes: a little darker, warmer, softer
and JPEG-compressed photographs, noisier and more widely spaced B-scans, which a clinician reads without
trouble.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from training.phantom.cfp_render import CFP_SIZE
from training.phantom.sampling import N_FRAMES, SCAN_MM

REFERENCE = "reference"


@dataclass(frozen=True)
class Device:
    """One acquisition setup. CFP values act on the 0..1 photograph; OCT values on the 0..255 B-scans."""

    name: str
    held_out: bool = False  #: never in a training cohort
    exposure: float = 1.0  #: multiplies the photograph's brightness
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)  #: per-channel gain (R, G, B): the colour cast
    gamma: float = 1.0  #: applied after exposure and colour (> 1 darkens the mid-tones)
    cfp_blur: float = 0.0  #: extra Gaussian blur radius, px (softer optics)
    cfp_resolution: int = CFP_SIZE  #: sensor pixels across the field (resampled to it and back)
    cfp_noise: float = 0.0  #: sensor noise, standard deviation in 0..255 grey levels
    jpeg_quality: int | None = None  #: the camera's JPEG compression (None: lossless)
    oct_frames: int = N_FRAMES  #: B-scans per 6 mm cube (fewer: wider spacing)
    oct_gain: float = 1.0
    oct_speckle: float = 0.0  #: extra multiplicative (log-normal) speckle, sigma
    oct_noise: float = 0.0  #: extra additive noise, standard deviation in grey levels
    oct_blur: float = 0.0  #: extra Gaussian blur radius of each B-scan, px

    def __post_init__(self) -> None:
        if not self.name or self.exposure <= 0 or self.gamma <= 0 or self.oct_gain <= 0 or min(self.colour) <= 0:
            raise ValueError(f"device {self.name!r}: name, exposure, gamma, gains and colour must be positive")
        if not 16 <= self.cfp_resolution <= 4 * CFP_SIZE or not 3 <= self.oct_frames <= 4 * N_FRAMES:
            raise ValueError(f"device {self.name!r}: cfp_resolution or oct_frames out of range")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"device {self.name!r}: jpeg_quality must be 1..95 or None")
        if min(self.cfp_blur, self.cfp_noise, self.oct_speckle, self.oct_noise, self.oct_blur) < 0:
            raise ValueError(f"device {self.name!r}: blur, noise and speckle must be >= 0")

    def describe(self) -> dict:
        """For cohort.json and benchmark results."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(REFERENCE),
        Device(  # a brighter, cooler camera with a larger sensor; a slightly noisier OCT
            "site-b",
            exposure=1.08,
            colour=(0.95, 1.0, 1.06),
            cfp_blur=0.4,
            cfp_noise=2.0,
            jpeg_quality=92,
            oct_gain=1.08,
            oct_speckle=0.08,
            oct_noise=2.0,
        ),
        Device(  # a darker, slightly warm camera with a smaller sensor; a denser OCT raster
            "site-c",
            exposure=0.92,
            colour=(1.04, 0.98, 0.93),
            gamma=1.05,
            cfp_blur=0.6,
            cfp_resolution=384,
            jpeg_quality=85,
            oct_frames=31,
            oct_gain=0.94,
            oct_speckle=0.12,
            oct_noise=3.0,
        ),
        Device(  # held out: darker, warmer, softer, JPEG-compressed photos; noisier, wider-spaced B-scans
            "field-x",
            held_out=True,
            exposure=0.82,
            colour=(1.08, 0.95, 0.85),
            gamma=1.1,
            cfp_blur=1.2,
            cfp_resolution=320,
            cfp_noise=4.0,
            jpeg_quality=55,
            oct_frames=19,
            oct_gain=0.86,
            oct_speckle=0.3,
            oct_noise=6.0,
            oct_blur=0.6,
        ),
    )
}
TRAINING_DEVICES: tuple[str, ...] = tuple(n for n, d in DEVICES.items() if not d.held_out)
HELD_OUT_DEVICES: tuple[str, ...] = tuple(n for n, d in DEVICES.items() if d.held_out)


def get_device(name: str) -> Device:
    """The named device; ValueError lists the known ones."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICES)}") from None


def apply_cfp(device: Device, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The photograph as `device` takes it (uint8 [H, W, 3] in and out); the reference returns it unchanged."""
    if device.name == REFERENCE:
        return rgb
    image = np.clip(rgb.astype(np.float32) / 255.0 * device.exposure * np.asarray(device.colour, np.float32), 0, 1)
    image = np.clip(image**device.gamma * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pil = Image.fromarray(image)
    if device.cfp_blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(device.cfp_blur))
    size = pil.size
    if device.cfp_resolution != size[0]:
        side = device.cfp_resolution
        pil = pil.resize((side, side), Image.BILINEAR).resize(size, Image.BICUBIC)
    out = np.asarray(pil, dtype=np.float32)
    if device.cfp_noise > 0:
        out = out + rng.normal(0.0, device.cfp_noise, size=out.shape).astype(np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out if device.jpeg_quality is None else jpeg_roundtrip(out, device.jpeg_quality)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """`image` (uint8, grey or RGB) after JPEG compression at `quality` and decompression."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB" if image.ndim == 3 else "L"))


def apply_oct(device: Device, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The B-scans as `device` records them (uint8 [F, H, W] in and out); the reference returns them unchanged."""
    if device.name == REFERENCE:
        return volume
    out = volume.astype(np.float32) * np.float32(device.oct_gain)
    if device.oct_speckle > 0:
        s = np.float32(device.oct_speckle)
        out *= np.exp(s * rng.standard_normal(out.shape, dtype=np.float32) - s * s / 2)
    if device.oct_noise > 0:
        out += np.float32(device.oct_noise) * rng.standard_normal(out.shape, dtype=np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if device.oct_blur > 0:
        blur = ImageFilter.GaussianBlur(device.oct_blur)
        out = np.stack([np.asarray(Image.fromarray(frame).filter(blur)) for frame in out])
    return out


def fovea_frame(fovea_y_mm: float, n_frames: int) -> int:
    """0-based B-scan nearest the fovea in a cube of `n_frames` (sampling.frame_y's spacing)."""
    return int(np.clip(round((fovea_y_mm + SCAN_MM / 2) * n_frames / SCAN_MM - 0.5), 0, n_frames - 1))
