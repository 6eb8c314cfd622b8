"""ONNX export of the image encoders (torch.onnx, dynamo exporter) with a dynamic batch axis.

Graph interface (the runtime relies on it): input `pixels` float32 [batch, 3, 224, 224]; outputs `tokens`
float32 [batch, 196, D] and `pooled` float32 [batch, D]. The fp16 variant keeps that float32 interface and
casts inside, so callers never change; its weights and arithmetic are float16 (for GPUs).
"""

from __future__ import annotations

import copy
import io
import logging
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

from grok_pacs.model.vit import RetinaEncoder, has_lora, merge_qkv_lora

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("tokens", "pooled")
#: Single-file ONNX (protobuf) holds up to 2 GiB; larger graphs keep weights in a side file.
SINGLE_FILE_LIMIT = 1_800_000_000

log = logging.getLogger(__name__)


class _EncoderGraph(nn.Module):
    """What is traced: the encoder, optionally in float16 behind float32 casts."""

    def __init__(self, encoder: RetinaEncoder, fp16: bool) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).eval()
        if has_lora(self.encoder):
            merge_qkv_lora(self.encoder)
        self.fp16 = fp16
        if fp16:
            self.encoder.half()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.half() if self.fp16 else pixels
        tokens, pooled = self.encoder(x)
        return tokens.float(), pooled.float()


def export_encoder(encoder: RetinaEncoder, path: str | Path, *, fp16: bool = False) -> Path:
    """Write `encoder` (LoRA merged if present) to `path` as ONNX; returns the path.

    The weights may spill into `<path>.data` next to it when the graph exceeds the single-file limit; a
    bundle lists that file too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _EncoderGraph(encoder, fp16).eval()
    size = encoder.cfg.img_size
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    with torch.no_grad(), redirect_stdout(io.StringIO()):  # the exporter prints its own progress lines
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_shapes={"pixels": {0: batch}}, dynamo=True,
                          external_data=weight_bytes > SINGLE_FILE_LIMIT, verbose=False)
    log.info("exported %s (%s, %.1f MB of weights)", path, "fp16" if fp16 else "fp32", weight_bytes / 1e6)
    return path
