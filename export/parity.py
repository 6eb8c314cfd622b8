"""Parity of an exported encoder against torch: max abs difference and cosine similarity, with tolerances.

Run on random ImageNet-normalised inputs at several batch sizes (which also proves the dynamic batch
axis). Beyond tolerance is a `ParityError`: a bundle is never built from an export that drifted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from grok_pacs.analysis.onnx_session import create_session, run_encoder
from grok_pacs.model.vit import RetinaEncoder


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  #: largest allowed |onnx - torch| over every output element
    min_cosine: float  #: smallest allowed cosine similarity of the flattened outputs


#: float32 differs from torch only by kernel order; float16 by its 10-bit mantissa through the blocks; int8 by
#: per-channel weight and per-tensor dynamic activation quantisation (ViT-L/16, random weights: cosine 0.9995).
TOLERANCES = {
    "float32": Tolerance(max_abs=5e-3, min_cosine=0.99999),
    "float16": Tolerance(max_abs=0.1, min_cosine=0.999),
    "int8": Tolerance(max_abs=1.0, min_cosine=0.999),
}


class ParityError(AssertionError):
    """The ONNX graph does not reproduce torch within tolerance; the message has the numbers."""


@dataclass(frozen=True)
class ParityResult:
    name: str
    dtype: str
    batch_sizes: tuple[int, ...]
    max_abs: float
    cosine: float
    tolerance: Tolerance
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.name} ({self.dtype}, batches {list(self.batch_sizes)}): max abs diff {self.max_abs:.3g} "
            f"(<= {self.tolerance.max_abs}), cosine {self.cosine:.7f} (>= {self.tolerance.min_cosine}): {verdict}"
        )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def measure_encoder_parity(
    encoder: RetinaEncoder,
    onnx_path: str | Path,
    *,
    dtype: str = "float32",
    batch_sizes: tuple[int, ...] = (1, 2),
    seed: int = 0,
    tolerance: Tolerance | None = None,
    device: str = "cpu",
    name: str | None = None,
) -> ParityResult:
    """Compare torch (float32) with the ONNX graph on the same inputs; a drift beyond tolerance is reported in
    the result (`passed`), a wrong output shape raises ParityError."""
    tol = tolerance or TOLERANCES[dtype]
    session = create_session(onnx_path, device)
    generator = torch.Generator().manual_seed(seed)
    worst, cosine = 0.0, 1.0
    size = encoder.cfg.img_size
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            ref = [t.numpy() for t in encoder.eval()(pixels)]
        got = run_encoder(session, pixels.numpy())
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise ParityError(f"{onnx_path}: output shape {g.shape} != torch {r.shape} at batch {batch}")
            worst = max(worst, float(np.abs(r - g).max()))
            cosine = min(cosine, _cosine(r, g))
    passed = worst <= tol.max_abs and cosine >= tol.min_cosine
    return ParityResult(name or Path(onnx_path).name, dtype, tuple(batch_sizes), worst, cosine, tol, passed)


def check_encoder_parity(
    encoder: RetinaEncoder,
    onnx_path: str | Path,
    *,
    dtype: str = "float32",
    batch_sizes: tuple[int, ...] = (1, 2),
    name: str | None = None,
) -> ParityResult:
    """`measure_encoder_parity` within the dtype's tolerance, or ParityError (what a bundle build needs)."""
    result = measure_encoder_parity(encoder, onnx_path, dtype=dtype, batch_sizes=batch_sizes, name=name)
    if not result.passed:
        raise ParityError(str(result))
    return result
