"""Biomarker heads: linear regressors from an encoder's pooled feature to biomarker values.

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


def _array(value: Any) -> np.ndarray:
    """numpy float64 from numpy, lists or torch tensors (without importing torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


@dataclass(frozen=True)
class BiomarkerHead:
    modality: Modality
    weight: np.ndarray  #: [K, D]: value = feature @ weight.T + bias, in biomarker units
    bias: np.ndarray  #: [K]

    @property
    def keys(self) -> tuple[str, ...]:
        return KEYS_BY_MODALITY[self.modality]

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    def __post_init__(self) -> None:
        k = len(KEYS_BY_MODALITY[Modality(self.modality)])
        if self.weight.ndim != 2 or self.weight.shape[0] != k or self.bias.shape != (k,):
            raise ValueError(
                f"{self.modality} head needs weight [{k}, D] and bias [{k}], got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )

    @classmethod
    def from_ridge(cls, modality: Modality | str, weight: Any, bias: Any) -> BiomarkerHead:
        """A head from a fitted linear model (weight [K, D], bias [K]; numpy or torch)."""
        return cls(Modality(modality), _array(weight), _array(bias).reshape(-1))

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
        """[B, D] (or [D]) pooled features -> [B, K] (or [K]) values in biomarker units."""
        x = _array(features)
        if x.shape[-1] != self.feature_dim:
            raise ValueError(f"{self.modality} head expects {self.feature_dim}-d features, got {x.shape[-1]}")
        return x @ self.weight.T + self.bias

    def predict_dict(self, feature: Any) -> dict[str, float]:
        """One eye's pooled feature [D] -> {biomarker key: value}."""
        values = self.predict(_array(feature).reshape(-1))
        return {key: float(v) for key, v in zip(self.keys, values)}

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
        return cls(modality, tensors["weight"].astype(np.float64), tensors["bias"].astype(np.float64))


def estimates_in_range(values: Mapping[str, float]) -> dict[str, float]:
    """Clip head outputs into each biomarker's plausible range (a linear head can overshoot)."""
    out = {}
    for key, value in values.items():
        low, high = BY_KEY[key].plausible
        out[key] = float(min(max(value, low), high))
    return out
