"""Stage-2 data: one preprocessed 224 image and one biomarker vector per eye, cached as a tensor file.

OCT: the foveal B-scan chosen by `grok_pacs.analysis.preprocess.select_foveal_bscan` (the function the runtime uses),
preprocessed by the runtime's OCT preprocessing. CFP: the fundus photograph through the runtime's CFP
preprocessing. Targets are the modality's biomarkers (31 OCT / 6 CFP) in their units, NaN where missing;
`BiomarkerStats` standardises them with training-split statistics (saved with the checkpoint).

Decoding and resizing hundreds of DICOM volumes each epoch would dominate a CPU run, so the preprocessed
images are written once to `<out_dir>/cache/` (safetensors, float16) and reused while the manifest and the
image files are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from grok_pacs.analysis.imaging import read_cfp, read_oct_volume
from grok_pacs.analysis.preprocess import preprocess_cfp, preprocess_oct, select_foveal_bscan
from grok_pacs.model.config import IMAGENET_MEAN, IMAGENET_STD
from training.manifest import CohortRecord, load_manifest

log = logging.getLogger(__name__)

CACHE_VERSION = 1  #: bump when the preprocessing written to the cache changes
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)  #: preprocessing processes (decoding dominates: CPU bound)
MIN_EYES_PER_WORKER = 8  #: below this a process pool costs more than it saves


@dataclass(frozen=True)
class BiomarkerStats:
    """Training-split mean and standard deviation per biomarker (NaN ignored)."""

    keys: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, keys: tuple[str, ...], values: torch.Tensor) -> BiomarkerStats:
        arr = values.double().numpy()
        if arr.size == 0:
            raise ValueError("cannot fit biomarker statistics on an empty training split")
        with np.errstate(all="ignore"):
            mean, std = np.nanmean(arr, axis=0), np.nanstd(arr, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        return cls(tuple(keys), tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def standardise(self, values: torch.Tensor) -> torch.Tensor:
        """(values - mean) / std per biomarker; NaN stays NaN (the model's mask token takes it)."""
        mean = torch.tensor(self.mean, dtype=values.dtype, device=values.device)
        std = torch.tensor(self.std, dtype=values.dtype, device=values.device)
        return (values - mean) / std

    def to_dict(self) -> dict:
        return {"keys": list(self.keys), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> BiomarkerStats:
        return cls(tuple(data["keys"]), tuple(data["mean"]), tuple(data["std"]))


@dataclass
class Stage2Data:
    """All eyes of a cohort for one modality; rows line up across fields."""

    keys: tuple[str, ...]
    images: torch.Tensor  #: [N, 3, 224, 224] float16, normalised like the runtime's preprocessing
    values: torch.Tensor  #: [N, n] float32 in biomarker units, NaN = missing
    subjects: list[str]
    splits: list[str]
    frames: list[int]  #: chosen B-scan per eye (-1 for CFP)

    def rows(self, split: str) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(self.splits) if s == split], dtype=torch.long)

    def check_disjoint(self, a: str = "train", b: str = "test") -> None:
        """Raise if a subject has eyes in both splits (evaluation must be on unseen subjects)."""
        shared = {self.subjects[i] for i in self.rows(a).tolist()} & {self.subjects[i] for i in self.rows(b).tolist()}
        if shared:
            raise ValueError(
                f"subjects in both the {a} and {b} splits: {sorted(shared)[:5]} "
                f"({len(shared)} in all); split the cohort by subject"
            )


def _load_one(job: tuple[CohortRecord, str]) -> tuple[np.ndarray, int]:
    """One eye's encoder input (float16 numpy, small to send between processes) and its B-scan index."""
    record, modality = job
    if modality == "CFP":
        return preprocess_cfp(read_cfp(record.cfp_path)).astype(np.float16), -1
    volume = read_oct_volume(record.oct_path)
    index, _method = select_foveal_bscan(volume)
    return preprocess_oct(volume[index]).astype(np.float16), int(index)


def _fingerprint(manifest: Path, records: list[CohortRecord], modality: str) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{modality}:".encode())
    digest.update(manifest.read_bytes())
    for r in records:
        path = r.cfp_path if modality == "CFP" else r.oct_path
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def build_data(
    records: list[CohortRecord],
    modality: str,
    keys: tuple[str, ...],
    progress: bool = True,
    workers: int = DEFAULT_WORKERS,
) -> Stage2Data:
    """Read and preprocess every eye (slow: decodes the images), in `workers` processes."""
    jobs = [(r, modality) for r in records]
    workers = max(1, min(workers, len(jobs) // MIN_EYES_PER_WORKER))
    bar = tqdm(total=len(jobs), desc=f"preprocess {modality}", disable=not progress, unit="eye")
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_load_one(job))
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_load_one, jobs, chunksize=4):
                results.append(result)
                bar.update()
    bar.close()
    images = [torch.from_numpy(image) for image, _ in results]
    frames = [frame for _, frame in results]
    values = torch.tensor([[r.biomarkers.get(k, math.nan) for k in keys] for r in records], dtype=torch.float32)
    return Stage2Data(
        tuple(keys), torch.stack(images), values, [r.subject_id for r in records], [r.split for r in records], frames
    )


def load_data(
    manifest: Path | str,
    modality: str,
    keys: tuple[str, ...],
    cache_dir: Path | str,
    progress: bool = True,
    workers: int = DEFAULT_WORKERS,
) -> Stage2Data:
    """The cohort's Stage2Data, from the cache when the manifest and its image files are unchanged."""
    manifest = Path(manifest)
    records = load_manifest(manifest)
    tag = _fingerprint(manifest, records, modality)
    cache = Path(cache_dir) / f"{modality.lower()}-{tag}.safetensors"
    meta_path = cache.with_suffix(".json")
    if cache.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("keys") == list(keys):
            tensors = load_file(str(cache))
            log.info("stage 2: %d %s eyes from cache %s", len(meta["subjects"]), modality, cache)
            return Stage2Data(
                tuple(keys), tensors["images"], tensors["values"], meta["subjects"], meta["splits"], meta["frames"]
            )
    data = build_data(records, modality, keys, progress, workers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": data.images.contiguous(), "values": data.values.contiguous()}, str(cache))
    meta = {
        "keys": list(keys),
        "subjects": data.subjects,
        "splits": data.splits,
        "frames": data.frames,
        "manifest": str(manifest),
        "modality": modality,
    }
    meta_path.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return data


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (up to 6 %), zoom (0.93-1.07), contrast/brightness jitter and noise; no flips
    (a flip would swap nasal and temporal subfields)."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    scale, tx, ty = uniform(0.93, 1.07), uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale, scale, tx, ty
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    contrast = uniform(0.85, 1.15).to(images)[:, None, None, None]
    brightness = uniform(-0.1, 0.1).to(images)[:, None, None, None]
    noise = 0.03 * torch.randn(images.shape, generator=generator).to(images)
    return out * contrast + brightness + noise


def augment_acquisition(images: torch.Tensor, generator: torch.Generator, modality: str) -> torch.Tensor:
    """What another camera or OCT would change, drawn per image: exposure (0.75-1.25), gamma (0.85-1.2),
    colour cast (CFP: channel gains 0.88-1.12), optical blur (half the images, sigma 0.3-1.5 px), sensor noise
    (OCT also speckle) and JPEG compression (half the images, quality 40-95). Acts on encoder inputs
    (normalised [N, 3, H, W]); the anatomy, and so the biomarker targets, are untouched."""
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[None, :, None, None]
    x = (images.detach().float().cpu() * std + mean).clamp(0, 1)
    gain = uniform(0.75, 1.25)[:, None, None, None]
    if modality == "CFP":
        gain = gain * uniform(0.88, 1.12, 3)[:, :, None, None]
    x = (x * gain).clamp(0, 1) ** uniform(0.85, 1.2)[:, None, None, None]
    blur, sigma = torch.rand(n, generator=generator) < 0.5, uniform(0.3, 1.5)
    x = torch.stack([_gaussian_blur(x[i], float(sigma[i])) if blur[i] else x[i] for i in range(n)])
    if modality == "OCT":  # speckle: multiplicative, the same in the three (grey) channels
        s = uniform(0.0, 0.3)[:, None, None, None]
        x = x * torch.exp(s * torch.randn(n, 1, *x.shape[2:], generator=generator) - s * s / 2)
    noise = uniform(0.0, 0.03)[:, None, None, None] * torch.randn(
        n, 1 if modality == "OCT" else 3, *x.shape[2:], generator=generator
    )
    x = (x + noise).clamp(0, 1)
    jpeg, quality = torch.rand(n, generator=generator) < 0.5, torch.randint(40, 96, (n,), generator=generator)
    x = torch.stack([_jpeg(x[i], int(quality[i])) if jpeg[i] else x[i] for i in range(n)])
    return ((x - mean) / std).to(images.device, images.dtype)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """[C, H, W] blurred by a separable Gaussian (radius 3 sigma, edges replicated)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.exp(-((torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2) / 2)
    taps = taps / taps.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)[0]


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """[3, H, W] in 0..1 through a JPEG encode and decode at `quality` (8-bit, as a camera writes it)."""
    array = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(decoded).permute(2, 0, 1)
