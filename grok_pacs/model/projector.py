"""The projectors (docs/domain.md, The GROK model, stage 3): encoder patch tokens -> LLM input embeddings.

CFP: Linear(D, H) - GELU - Linear(H, H). OCT: Linear(D, D) - GELU - Linear(D, D), then the same CFP projector
(shared weights, as the paper's code does). A modality that is absent for an eye is fed as ONE learned
placeholder embedding (`missing_cfp` / `missing_oct`) instead of 196 tokens: the LLM still sees where that
modality would be and can learn (with modality dropout in stage 3) to say it is missing, while zero vectors
would be indistinguishable from a black image after the projector's biases.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from grok_pacs.model.checkpoints import load_checked
from grok_pacs.model.config import ProjectorConfig


class Projectors(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.vision_dim, cfg.llm_hidden_size
        self.cfp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h))
        self.oct = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.missing_cfp = nn.Parameter(torch.randn(1, h) * 0.02)
        self.missing_oct = nn.Parameter(torch.randn(1, h) * 0.02)

    def project_cfp(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., N, D] CFP patch tokens -> [..., N, H]."""
        return self.cfp(tokens)

    def project_oct(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., N, D] OCT patch tokens -> [..., N, H] (OCT MLP, then the CFP projector)."""
        return self.cfp(self.oct(tokens))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, D] patch tokens of a square grid -> [k*k, D] averages over a k x k grid (`cfg.token_grid`).

        CPU presets pool so that a 135M-parameter stand-in LLM trains and decodes in minutes; the paper's
        preset keeps every token (token_grid 0).
        """
        if not self.cfg.token_grid:
            return tokens
        side = math.isqrt(tokens.shape[0])
        if side * side != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} patch tokens do not form a square grid; cannot pool them")
        grid = tokens.T.reshape(1, tokens.shape[1], side, side)
        pooled = nn.functional.adaptive_avg_pool2d(grid, self.cfg.token_grid)
        return pooled.reshape(tokens.shape[1], -1).T

    def visual_embeddings(self, cfp: torch.Tensor | None, oct: torch.Tensor | None) -> torch.Tensor:
        """One sample's embeddings for the <image> slot: CFP first, then OCT; placeholders where absent.

        cfp / oct: [N, D] (or None). Returns [N_cfp + N_oct, H] in the projector's dtype (N after pooling).
        """
        dtype = self.missing_cfp.dtype
        parts = [
            self.project_cfp(self.pool(cfp.to(dtype))) if cfp is not None else self.missing_cfp,
            self.project_oct(self.pool(oct.to(dtype))) if oct is not None else self.missing_oct,
        ]
        return torch.cat(parts, dim=0)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu().float() for k, v in self.state_dict().items()}
        save_file(
            state,
            str(path),
            metadata={
                "format": "grok-pacs-projectors/1",
                "vision_dim": str(self.cfg.vision_dim),
                "llm_hidden_size": str(self.cfg.llm_hidden_size),
            },
        )
        return path

    @classmethod
    def load(cls, path: str | Path, cfg: ProjectorConfig) -> Projectors:
        """Projectors saved by `save`; a file of other shapes raises CheckpointError naming the keys."""
        module = cls(cfg)
        load_checked(module, load_file(str(path)), source=f"projector file {path}")
        return module.eval()
