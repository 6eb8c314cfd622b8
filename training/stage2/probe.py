"""Ridge linear probe: biomarker values from frozen pooled encoder features.

Used three ways: the stage-2 evaluation (aligned vs plain encoder), the best-by-validation choice during
training, and the biomarker heads the runtime ships (the fit folded into one Linear in biomarker units).
Features and targets are standardised with training statistics; each biomarker gets its own ridge
strength, chosen by k-fold cross-validation *within the training rows* (folds split by subject, so the two
eyes of a subject never sit on both sides), and is fitted on the rows where it is known (NaN = missing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grok_pacs.domain.biomarkers import BY_KEY

CV_FOLDS = 5


@dataclass(frozen=True)
class RidgeProbe:
    """A fitted probe; `coef`/`intercept` act on standardised features and give standardised values."""

    keys: tuple[str, ...]
    x_mean: np.ndarray  # [D]
    x_scale: np.ndarray  # [D]
    y_mean: np.ndarray  # [n] training mean of each biomarker (its unit)
    y_scale: np.ndarray  # [n] training standard deviation of each biomarker (its unit)
    coef: np.ndarray  # [D, n]
    intercept: np.ndarray  # [n]
    alphas: np.ndarray  # [n] chosen ridge strength per biomarker

    def predict_standardised(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.x_mean) / self.x_scale) @ self.coef + self.intercept

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N, D] features -> [N, n] biomarker values in their units."""
        return self.predict_standardised(features) * self.y_scale + self.y_mean

    def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight [n, D], bias [n]) with predict(x) == x @ weight.T + bias: the probe as one Linear layer."""
        scaled = self.coef / self.x_scale[:, None]  # [D, n]
        weight = np.ascontiguousarray((scaled * self.y_scale[None, :]).T)  # C order: safetensors writes raw memory
        bias = self.y_mean + self.y_scale * (self.intercept - self.x_mean @ scaled)
        return weight, bias


def _scale(values: np.ndarray) -> np.ndarray:
    """Standard deviation per column (NaN ignored); 1 where a column is constant or empty."""
    with np.errstate(all="ignore"):
        std = np.nanstd(values, axis=0)
    return np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients [A, D, n] and intercepts [A, n] for every alpha (x, y uncentred; one SVD)."""
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)  # [k, n]
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # [A, k]
    coefs = np.einsum("dk,ak,kn->adn", vt.T, shrink, uty)
    intercepts = ym[None, :] - np.einsum("d,adn->an", xm, coefs)
    return coefs, intercepts


def _folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row, whole groups (subjects) per fold."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[i]: rank % n_folds for rank, i in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def _choose_alpha(x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: np.ndarray, seed: int) -> np.ndarray:
    """Per target, the alpha with the lowest cross-validated squared error (index into alphas)."""
    n_folds = min(CV_FOLDS, len(np.unique(groups)))
    if n_folds < 2 or len(alphas) == 1:
        return np.zeros(y.shape[1], dtype=int)
    fold = _folds(groups, n_folds, seed)
    sse = np.zeros((len(alphas), y.shape[1]))
    for k in range(n_folds):
        train, held = fold != k, fold == k
        coefs, intercepts = _ridge_path(x[train], y[train], alphas)
        pred = np.einsum("md,adn->amn", x[held], coefs) + intercepts[:, None, :]
        sse += ((pred - y[held][None]) ** 2).sum(axis=1)
    return sse.argmin(axis=0)


def fit_ridge(
    features: np.ndarray,
    targets: np.ndarray,
    keys: tuple[str, ...],
    groups: np.ndarray,
    alphas: tuple[float, ...],
    seed: int = 0,
) -> RidgeProbe:
    """Fit the probe on training rows. `targets` in biomarker units (NaN = missing); `groups` = subject ids."""
    features, targets = np.asarray(features, np.float64), np.asarray(targets, np.float64)
    if features.ndim != 2 or targets.shape != (features.shape[0], len(keys)):
        raise ValueError(f"probe: features {features.shape} and targets {targets.shape} do not match {len(keys)} keys")
    x_mean, x_scale = features.mean(axis=0), _scale(features)
    with np.errstate(all="ignore"):
        y_mean = np.nanmean(targets, axis=0)
    # A biomarker never measured in training predicts the middle of its normal range.
    y_mean = np.array([m if np.isfinite(m) else float(np.mean(BY_KEY[k].normal)) for m, k in zip(y_mean, keys)])
    y_scale = _scale(targets)
    xs, ys = (features - x_mean) / x_scale, (targets - y_mean) / y_scale
    alpha_grid = np.asarray(alphas, dtype=np.float64)
    coef = np.zeros((features.shape[1], len(keys)))
    intercept = np.zeros(len(keys))
    chosen = np.full(len(keys), alpha_grid[0])
    known = ~np.isnan(ys)
    # Biomarkers missing on the same rows share one set of SVDs.
    patterns: dict[bytes, list[int]] = {}
    for j in range(len(keys)):
        patterns.setdefault(known[:, j].tobytes(), []).append(j)
    for cols in patterns.values():
        rows = known[:, cols[0]]
        if rows.sum() < 2:
            continue  # (almost) never measured: predict the training mean
        x, y, g = xs[rows], ys[rows][:, cols], np.asarray(groups)[rows]
        best = _choose_alpha(x, y, g, alpha_grid, seed)
        coefs, intercepts = _ridge_path(x, y, alpha_grid)
        for c, j in enumerate(cols):
            coef[:, j], intercept[j], chosen[j] = coefs[best[c], :, c], intercepts[best[c], c], alpha_grid[best[c]]
    return RidgeProbe(tuple(keys), x_mean, x_scale, y_mean, y_scale, coef, intercept, chosen)


def probe_errors(probe: RidgeProbe, features: np.ndarray, targets: np.ndarray) -> dict:
    """MAE and RMSE per biomarker (units and standardised by the training SD) and their means over biomarkers."""
    targets = np.asarray(targets, np.float64)
    err = probe.predict(np.asarray(features, np.float64)) - targets
    per: dict[str, dict[str, float]] = {}
    for j, key in enumerate(probe.keys):
        e = err[:, j][~np.isnan(err[:, j])]
        if e.size == 0:
            continue
        mae, rmse = float(np.abs(e).mean()), float(np.sqrt((e**2).mean()))
        per[key] = {
            "mae": mae,
            "rmse": rmse,
            "mae_std": mae / float(probe.y_scale[j]),
            "rmse_std": rmse / float(probe.y_scale[j]),
            "n": int(e.size),
        }
    if not per:
        raise ValueError("probe evaluation: no known target values to evaluate against")
    overall = {m: float(np.mean([v[m] for v in per.values()])) for m in ("mae", "rmse", "mae_std", "rmse_std")}
    return {"overall": overall, "per_biomarker": per}
