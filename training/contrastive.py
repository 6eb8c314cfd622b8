"""Contrastive losses for stage-2 image-biomarker alignment (docs/domain.md, The GROK model, stage 2).

Two losses over a batch of paired embeddings (row i of `a` belongs with row i of `b`):

- ``clip``: the symmetric CLIP / InfoNCE loss. Logits are the cosine similarities divided by the
  temperature; cross-entropy picks the partner along rows (a -> b) and along columns (b -> a), averaged.
- ``ntxent``: SimCLR's NT-Xent, the paper's choice (temperature 0.5). The 2N embeddings are pooled; each
  one must pick its partner among the other 2N - 1, so same-modality pairs are negatives too.

The temperature is fixed or learned (CLIP's parametrisation: a learned log inverse temperature, its
inverse temperature clamped at 100 so the logits cannot blow up).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSS_KINDS = ("clip", "ntxent")
MAX_INVERSE_TEMPERATURE = 100.0  #: CLIP's clamp on the learned logit scale


def clip_loss(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over cosine similarities: mean of the a->b and b->a cross-entropies."""
    _check_pair(a, b)
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def nt_xent_loss(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2N embeddings picks its partner among the other 2N - 1."""
    _check_pair(a, b)
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b], dim=0), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"contrastive loss needs two [N, D] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < 2:
        raise ValueError(f"contrastive loss needs at least 2 pairs in a batch, got {a.shape[0]}")


class ContrastiveLoss(nn.Module):
    """The configured loss as a module, so a learned temperature trains and checkpoints with the model."""

    def __init__(self, kind: str = "clip", temperature: float = 0.1, learn_temperature: bool = False) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown contrastive loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.kind = kind
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_inv_temperature = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_inv_temperature", log_scale)

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature (inverse temperature clamped at MAX_INVERSE_TEMPERATURE)."""
        return 1.0 / self.log_inv_temperature.exp().clamp(max=MAX_INVERSE_TEMPERATURE)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.float(), b.float()
        if self.kind == "clip":
            return clip_loss(a, b, self.temperature)
        return nt_xent_loss(a, b, self.temperature)
