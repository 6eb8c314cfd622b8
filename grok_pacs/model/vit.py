"""The two image encoders: timm ViTs laid out exactly like RETFound / RetiZero (so their checkpoints load).

`RetinaEncoder.forward_tokens(x)` gives the 196 patch tokens after the final LayerNorm (cls token dropped),
which stage 3 projects into the LLM; `forward_pooled(x)` is their mean, the feature stage 2 aligns and the
biomarker heads read. `forward(x)` returns both (the ONNX graph's two outputs).

RetiZero carries a rank-8 LoRA on q and v of every qkv. `apply_qkv_lora` rebuilds that layout (to load the
checkpoint and to check the merge); `merge_qkv_lora` folds it into the qkv weights, so the exported and
served encoder is a plain ViT.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from grok_pacs.model.config import EncoderConfig


class RetinaEncoder(VisionTransformer):
    """A classifier-free timm ViT (final `norm` kept, no `fc_norm`, no `head`)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            global_pool="token",
            fc_norm=False,
            norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
        )
        self.cfg = cfg

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,224,224] normalised pixels -> [B,196,D] patch tokens after the final norm."""
        return self.forward_features(x)[:, self.num_prefix_tokens :]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[B,D]: mean of the patch tokens (the stage-2 image feature)."""
        return self.forward_tokens(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        tokens = self.forward_tokens(x)
        return tokens, tokens.mean(dim=1)


def build_encoder(cfg: EncoderConfig) -> RetinaEncoder:
    """A randomly initialised encoder in eval mode (load weights with grok_pacs.model.checkpoints)."""
    return RetinaEncoder(cfg).eval()


class LoraQKV(nn.Module):
    """RetiZero's qkv with LoRA: qkv(x), plus B_q A_q x on the q third and B_v A_v x on the v third.

    Parameter names (`qkv`, `linear_a_q`, `linear_b_q`, `linear_a_v`, `linear_b_v`) are RetiZero's, so its
    state dict loads without renaming. No scaling factor: RetiZero adds the product as is.
    """

    def __init__(self, qkv: nn.Linear, rank: int) -> None:
        super().__init__()
        dim = qkv.in_features
        self.qkv = qkv
        self.dim = dim
        self.linear_a_q = nn.Linear(dim, rank, bias=False)
        self.linear_b_q = nn.Linear(rank, dim, bias=False)
        self.linear_a_v = nn.Linear(dim, rank, bias=False)
        self.linear_b_v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.linear_b_q.weight)
        nn.init.zeros_(self.linear_b_v.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        q = qkv[..., : self.dim] + self.linear_b_q(self.linear_a_q(x))
        k = qkv[..., self.dim : 2 * self.dim]
        v = qkv[..., 2 * self.dim :] + self.linear_b_v(self.linear_a_v(x))
        return torch.cat([q, k, v], dim=-1)

    def merged(self) -> nn.Linear:
        """A plain Linear equal to this module: W_q += B_q A_q, W_v += B_v A_v (bias unchanged)."""
        out = nn.Linear(self.dim, 3 * self.dim, bias=self.qkv.bias is not None)
        with torch.no_grad():
            weight = self.qkv.weight.detach().clone()
            weight[: self.dim] += self.linear_b_q.weight @ self.linear_a_q.weight
            weight[2 * self.dim :] += self.linear_b_v.weight @ self.linear_a_v.weight
            out.weight.copy_(weight)
            if self.qkv.bias is not None:
                out.bias.copy_(self.qkv.bias)
        return out


def apply_qkv_lora(encoder: RetinaEncoder, rank: int) -> RetinaEncoder:
    """Wrap every block's qkv in a LoraQKV of `rank` (in place; returns the encoder)."""
    for block in encoder.blocks:
        if isinstance(block.attn.qkv, LoraQKV):
            raise ValueError("encoder already carries a qkv LoRA")
        block.attn.qkv = LoraQKV(block.attn.qkv, rank)
    return encoder


def merge_qkv_lora(encoder: RetinaEncoder) -> RetinaEncoder:
    """Fold every LoraQKV back into a plain qkv Linear (in place; returns the encoder)."""
    for block in encoder.blocks:
        if isinstance(block.attn.qkv, LoraQKV):
            block.attn.qkv = block.attn.qkv.merged()
    return encoder


def has_lora(encoder: nn.Module) -> bool:
    return any(isinstance(m, LoraQKV) for m in encoder.modules())
