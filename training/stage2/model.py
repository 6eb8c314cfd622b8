"""The stage-2 alignment model (docs/domain.md, The GROK model, stage 2): image encoder + projector, biomarker encoder,
loss.

The image side is the shared `RetinaEncoder` (its pooled feature: mean of the 196 patch tokens after the
final norm) followed by Linear-BN-ReLU-Linear-BN to `proj_dim`. The biomarker side takes the
*standardised* biomarker vector; a missing (NaN) value is replaced by a learned per-biomarker mask token
before Linear(n->128)-ReLU-Linear(128->proj_dim)-BN. Only the encoder survives stage 2: it is what stage 3
and the runtime use, and what the biomarker heads read.
"""

from __future__ import annotations

import torch
from torch import nn

from grok_pacs.model.config import EncoderConfig
from grok_pacs.model.vit import RetinaEncoder, build_encoder
from training.contrastive import ContrastiveLoss
from training.distributed import gather_with_grad


def image_projector(in_dim: int, proj_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, proj_dim),
        nn.BatchNorm1d(proj_dim),
        nn.ReLU(inplace=True),
        nn.Linear(proj_dim, proj_dim),
        nn.BatchNorm1d(proj_dim),
    )


class BiomarkerEncoder(nn.Module):
    """Standardised biomarker vector (NaN = missing) -> embedding; NaNs become a learned mask token."""

    def __init__(self, n_biomarkers: int, proj_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(n_biomarkers))
        self.net = nn.Sequential(
            nn.Linear(n_biomarkers, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim),
            nn.BatchNorm1d(proj_dim),
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(values)
        filled = torch.where(missing, self.mask_token.to(values.dtype).expand_as(values), values)
        return self.net(filled)


class AlignmentModel(nn.Module):
    """Encoder + projector and biomarker encoder, trained with a contrastive loss."""

    def __init__(
        self, encoder: RetinaEncoder, n_biomarkers: int, proj_dim: int, bio_hidden: int, loss: ContrastiveLoss
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = image_projector(encoder.embed_dim, proj_dim)
        self.biomarker_encoder = BiomarkerEncoder(n_biomarkers, proj_dim, bio_hidden)
        self.loss_fn = loss

    def forward(self, images: torch.Tensor, biomarkers: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of a batch of (image, standardised biomarker vector) pairs."""
        image_emb = self.projector(self.encoder.forward_pooled(images))
        bio_emb = self.biomarker_encoder(biomarkers.to(image_emb.dtype))
        return self.loss_fn(image_emb, bio_emb)


class GatheredAlignment(nn.Module):
    """The alignment loss of a global batch whose images are spread over the ranks (the DDP-wrapped module).

    Each rank encodes its share of the images; the pooled features are gathered (with gradients) so the
    projector's batch norm and the contrastive loss see the whole global batch, in its order, on every rank:
    the negatives and the normalisation statistics are those of one process with the same batch.
    """

    def __init__(self, model: AlignmentModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, local_images: torch.Tensor, biomarkers: torch.Tensor) -> torch.Tensor:
        """`local_images`: this rank's share; `biomarkers`: the whole global batch's standardised vectors."""
        m = self.model
        features = gather_with_grad(m.encoder.forward_pooled(local_images))
        image_emb = m.projector(features)
        return m.loss_fn(image_emb, m.biomarker_encoder(biomarkers.to(image_emb.dtype)))


def build_alignment_model(
    enc_cfg: EncoderConfig,
    n_biomarkers: int,
    proj_dim: int,
    bio_hidden: int,
    loss_kind: str,
    temperature: float,
    learn_temperature: bool,
) -> AlignmentModel:
    """A fresh model; load the encoder's start weights into `.encoder` afterwards when there are any."""
    encoder = build_encoder(enc_cfg)
    loss = ContrastiveLoss(loss_kind, temperature, learn_temperature)
    return AlignmentModel(encoder, n_biomarkers, proj_dim, bio_hidden, loss)
