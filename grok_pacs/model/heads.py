"""Biomarker heads: linear regressors from an encoder's features to biomarker values.

A head reads the pooled feature (the mean patch token) and, with `grid` > 0, the mean token of each cell of
a grid x grid partition of the patch grid (`head_input`): a global mean loses where things are, and many
biomarkers are about where (ETDRS-sector thicknesses, the cup inside the disc). On the phantom cohort a 4x4
grid cut the held-out OCT error from 0.52 to 0.35 training SDs (docs/training.md).

OCT head: 31 outputs in `grok_pacs.domain.biomarkers.OCT_KEYS` order (micrometres); CFP head: 6 outputs in
`CFP_KEYS` order (unitless). Stage 2 fits them (ridge on frozen features: `BiomarkerHead.fit_ridge`, or its
own solver and then `from_ridge(weight, bias)`); the runtime applies them with numpy, so serving needs no
torch for this step. Stored as safetensors with the modality and key order in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from grok_pacs.domain.biomarkers import BY_KEY, CFP_KEYS, OCT_KEYS, Modality

KEYS_BY_MODALITY: dict[Modality, tuple[str, ...]] = {Modality.OCT: OCT_KEYS, Modality.CFP: CFP_KEYS}


def grid_cells(tokens: Any, grid: int) -> np.ndarray:
    """[..., N, D] patch tokens of a square patch grid -> [..., grid * grid * D]: each cell's mean token, cells
    in row-major order, cell edges as torch's adaptive_avg_pool2d draws them (floor(i * side / grid) to
    ceil((i + 1) * side / grid), so cells may overlap by a patch when side is not a multiple of grid)."""
    tokens = _array(tokens)
    side = int(round(np.sqrt(tokens.shape[-2])))
    if side * side != tokens.shape[-2] or not 1 <= grid <= side:
        raise ValueError(f"grid_cells: {tokens.shape[-2]} tokens are not a square patch grid of side >= {grid}")
    patches = tokens.reshape(*tokens.shape[:-2], side, side, tokens.shape[-1])
    edges = [(i * side // grid, -(-(i + 1) * side // grid)) for i in range(grid)]
    cells = [patches[..., r0:r1, c0:c1, :].mean(axis=(-3, -2)) for r0, r1 in edges for c0, c1 in edges]
    return np.concatenate(cells, axis=-1)


def head_input(pooled: Any, tokens: Any, grid: int) -> np.ndarray:
    """What a head with `grid` reads: the pooled feature [..., D], then (grid > 0) the grid cells of `tokens`."""
    pooled = _array(pooled)
    if grid == 0:
        return pooled
    if tokens is None:
        raise ValueError(f"a head with a {grid}x{grid} grid needs the patch tokens, not only the pooled feature")
    return np.concatenate([pooled, grid_cells(tokens, grid)], axis=-1)


def _array(value: Any) -> np.ndarray:
    """numpy float64 from numpy, lists or torch tensors (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


@dataclass(frozen=True)
class BiomarkerHead:
    modality: Modality
    weight: np.ndarray  #: [K, F]: value = head_input @ weight.T + bias, in biomarker units
    bias: np.ndarray  #: [K]
    grid: int = 0  #: the grid of token cells read beside the pooled feature (0: pooled only)

    @property
    def keys(self) -> tuple[str, ...]:
        return KEYS_BY_MODALITY[self.modality]

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    def input_dim(self, embed_dim: int) -> int:
        """The width of `head_input` for an encoder of `embed_dim`: the pooled feature and grid * grid cells."""
        return embed_dim * (1 + self.grid * self.grid)

    def __post_init__(self) -> None:
        k = len(KEYS_BY_MODALITY[Modality(self.modality)])
        if self.grid < 0:
            raise ValueError(f"{self.modality} head: grid must be >= 0, got {self.grid}")
        if self.weight.ndim != 2 or self.weight.shape[0] != k or self.bias.shape != (k,):
            raise ValueError(
                f"{self.modality} head needs weight [{k}, D] and bias [{k}], got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )

    @classmethod
    def from_ridge(cls, modality: Modality | str, weight: Any, bias: Any, grid: int = 0) -> BiomarkerHead:
        """A head from a fitted linear model (weight [K, F], bias [K]; numpy or torch) on `head_input(.., grid)`."""
        return cls(Modality(modality), _array(weight), _array(bias).reshape(-1), int(grid))

    @classmethod
    def fit_ridge(cls, modality: Modality | str, features: Any, targets: Any, alpha: float = 1.0) -> BiomarkerHead:
        """Closed-form ridge on standardised features, one biomarker at a time (rows with NaN targets skipped).

        features [N, D]; targets [N, K] in the modality's key order. Standardisation is folded back into
        weight / bias, so `predict` takes raw features. A biomarker with no observed value predicts its
        normal-range midpoint.
        """
        modality = Modality(modality)
        x, y = _array(features), _array(targets)
        keys = KEYS_BY_MODALITY[modality]
        if y.ndim != 2 or y.shape[1] != len(keys) or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"fit_ridge: features [N, D] and targets [N, {len(keys)}] needed, got {x.shape} and {y.shape}"
            )
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / std
        weight = np.zeros((len(keys), x.shape[1]))
        bias = np.zeros(len(keys))
        for j, key in enumerate(keys):
            rows = ~np.isnan(y[:, j])
            if not rows.any():
                bias[j] = float(np.mean(BY_KEY[key].normal))
                continue
            zj, yj = z[rows], y[rows, j]
            z_mean, y_mean = zj.mean(0), yj.mean()  # centred on the rows this biomarker was observed in
            zc = zj - z_mean
            coef = np.linalg.solve(zc.T @ zc + alpha * np.eye(zc.shape[1]), zc.T @ (yj - y_mean))
            weight[j] = coef / std
            bias[j] = y_mean - float(coef @ (mean / std + z_mean))
        return cls(modality, weight, bias)

    def predict(self, features: Any) -> np.ndarray:
        """[B, F] (or [F]) head inputs (`head_input`) -> [B, K] (or [K]) values in biomarker units."""
        x = _array(features)
        if x.shape[-1] != self.feature_dim:
            raise ValueError(f"{self.modality} head expects {self.feature_dim}-d features, got {x.shape[-1]}")
        return x @ self.weight.T + self.bias

    def predict_dict(self, feature: Any) -> dict[str, float]:
        """One eye's head input [F] -> {biomarker key: value}."""
        values = self.predict(_array(feature).reshape(-1))
        return {key: float(v) for key, v in zip(self.keys, values)}

    def estimate(self, pooled: Any, tokens: Any = None) -> dict[str, float]:
        """One eye's pooled feature [D] and patch tokens [N, D] -> {biomarker key: value}."""
        return self.predict_dict(head_input(pooled, tokens, self.grid))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # safetensors copies raw memory: a transposed (non-contiguous) array would reload scrambled.
        tensors = {
            "weight": np.ascontiguousarray(self.weight, dtype=np.float32),
            "bias": np.ascontiguousarray(self.bias, dtype=np.float32),
        }
        save_file(
            tensors,
            str(path),
            metadata={
                "format": "grok-pacs-biomarker-head/1",
                "modality": str(self.modality),
                "keys": json.dumps(list(self.keys)),
                "grid": str(self.grid),
            },
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> BiomarkerHead:
        """A head saved by `save`; refuses a file whose key order is not the current biomarker schema."""
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
        modality = Modality(meta.get("modality", ""))  # ValueError names the bad value
        keys = tuple(json.loads(meta.get("keys", "[]")))
        if keys != KEYS_BY_MODALITY[modality]:
            raise ValueError(
                f"head file {path}: biomarker order {keys[:3]}... differs from grok_pacs.domain.biomarkers"
            )
        tensors = load_file(str(path))
        grid = int(meta.get("grid", "0"))  # heads saved before the grid read the pooled feature only
        return cls(modality, tensors["weight"].astype(np.float64), tensors["bias"].astype(np.float64), grid)


def estimates_in_range(values: Mapping[str, float]) -> dict[str, float]:
    """Clip head outputs into each biomarker's plausible range (a linear head can overshoot)."""
    out = {}
    for key, value in values.items():
        low, high = BY_KEY[key].plausible
        out[key] = float(min(max(value, low), high))
    return out
