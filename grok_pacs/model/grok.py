"""GrokModel: the LLaVA-style wrapper that splices visual embeddings into a Qwen2 causal LM.

The encoders are NOT part of this module: training passes precomputed patch tokens (frozen encoders, as in
the paper) and the runtime passes tokens from the ONNX encoders. Each sample's ONE `<image>` token is
replaced by [projected CFP tokens (196), projected OCT tokens (196)]; an absent modality contributes one
learned placeholder embedding instead (see grok_pacs.model.projector). Spliced positions carry no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from grok_pacs.model.projector import Projectors
from grok_pacs.model.prompt import IGNORE_INDEX, IMAGE_TOKEN

Tokens = torch.Tensor | Sequence[torch.Tensor | None] | None


def ensure_image_token(tokenizer: Any, llm: Any) -> int:
    """Add `<image>` as a special token when the tokenizer lacks it, growing the LLM's embeddings; its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def _per_sample(tokens: Tokens, batch: int, name: str) -> list[torch.Tensor | None]:
    """[B,N,D] tensor, list of [N,D]-or-None, or None -> list of length B."""
    if tokens is None:
        return [None] * batch
    items = list(tokens.unbind(0)) if isinstance(tokens, torch.Tensor) else list(tokens)
    if len(items) != batch:
        raise ValueError(f"{name}: {len(items)} samples for a batch of {batch}")
    return items


class GrokModel(nn.Module):
    """`GrokModel(llm, projectors, image_token_id)`; `forward` for training, `generate` for inference."""

    def __init__(self, llm: nn.Module, projectors: Projectors, image_token_id: int) -> None:
        super().__init__()
        hidden = llm.get_input_embeddings().weight.shape[1]
        if hidden != projectors.cfg.llm_hidden_size:
            raise ValueError(f"projectors output {projectors.cfg.llm_hidden_size}-d, the LLM expects {hidden}-d")
        self.llm = llm
        self.projectors = projectors
        self.image_token_id = int(image_token_id)

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cfp_tokens: Tokens = None,
        oct_tokens: Tokens = None,
        *,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """inputs_embeds / attention_mask / position_ids (/ labels) with the visual embeddings in place."""
        batch = input_ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        cfp_list, oct_list = _per_sample(cfp_tokens, batch, "cfp_tokens"), _per_sample(oct_tokens, batch, "oct_tokens")
        embed = self.llm.get_input_embeddings()
        rows, row_labels = [], []
        for i in range(batch):
            ids = input_ids[i][mask[i].bool()]
            where = (ids == self.image_token_id).nonzero().flatten()
            if where.numel() != 1:
                raise ValueError(f"sample {i} has {where.numel()} {IMAGE_TOKEN} tokens; exactly one is needed")
            pos = int(where[0])
            text = embed(ids)
            visual = self.projectors.visual_embeddings(cfp_list[i], oct_list[i]).to(text.dtype)
            rows.append(torch.cat([text[:pos], visual, text[pos + 1 :]], dim=0))
            if labels is not None:
                lab = labels[i][mask[i].bool()]
                fill = torch.full((visual.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)
                row_labels.append(torch.cat([lab[:pos], fill, lab[pos + 1 :]]))
        return self._pad(rows, row_labels, padding_side)

    def _pad(self, rows: list[torch.Tensor], row_labels: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
        length = max(r.shape[0] for r in rows)
        hidden, dtype, device = rows[0].shape[1], rows[0].dtype, rows[0].device
        embeds = torch.zeros(len(rows), length, hidden, dtype=dtype, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            span = slice(0, row.shape[0]) if side == "right" else slice(length - row.shape[0], length)
            embeds[i, span], mask[i, span] = row, 1
            if row_labels:
                labels[i, span] = row_labels[i]
        out = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        if row_labels:
            out["labels"] = labels
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cfp_tokens: Tokens = None,
        oct_tokens: Tokens = None,
        **kwargs: Any,
    ) -> Any:
        """Training / scoring pass; returns the LLM's CausalLMOutput (loss when labels are given)."""
        inputs = self.splice(input_ids, attention_mask, labels, cfp_tokens, oct_tokens, padding_side="right")
        return self.llm(**inputs, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cfp_tokens: Tokens = None,
        oct_tokens: Tokens = None,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """New token ids [B, T] (prompt excluded). Greedy unless temperature > 0; at most max_new_tokens."""
        inputs = self.splice(input_ids, attention_mask, None, cfp_tokens, oct_tokens, padding_side="left")
        return self.generate_spliced(inputs, max_new_tokens=max_new_tokens, temperature=temperature, **kwargs)

    @torch.no_grad()
    def generate_spliced(
        self, inputs: dict[str, torch.Tensor], *, max_new_tokens: int = 512, temperature: float = 0.0, **kwargs: Any
    ) -> Any:
        """`generate` from `splice(..., padding_side="left")`'s output (a caller that keeps its attention mask)."""
        inputs = {k: v for k, v in inputs.items() if k != "position_ids"}  # generate derives them from the mask
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        return self.llm.generate(**inputs, max_new_tokens=max_new_tokens, **sampling, **kwargs)
