"""ONNX export of the image encoders (torch.onnx, dynamo exporter) with a dynamic batch axis.

Graph interface (the runtime relies on it): input `pixels` float32 [batch, 3, 224, 224]; outputs `tokens`
float32 [batch, 196, D] and `pooled` float32 [batch, D], whatever the precision:
  float32  the default; parity with torch to float rounding.
  float16  weights and arithmetic in float16 behind float32 casts (for GPUs).
  int8     for CPU serving: the weight MatMuls (qkv, proj, fc1, fc2) quantised per output channel, activations
           quantised dynamically (onnxruntime DynamicQuantizeMatMul); attention and norms stay float32.
           Several times faster on CPUs with int8 dot products, at a looser parity tolerance (export.parity).
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

from grok_pacs.model.vit import RetinaEncoder, has_lora, merge_qkv_lora

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("tokens", "pooled")
PRECISIONS = ("float32", "float16", "int8")
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


def _trace(encoder: RetinaEncoder, path: Path, fp16: bool) -> None:
    graph = _EncoderGraph(encoder, fp16).eval()
    size = encoder.cfg.img_size
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    with torch.no_grad(), redirect_stdout(io.StringIO()):  # the exporter prints its own progress lines
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"pixels": {0: batch}},
            dynamo=True,
            external_data=weight_bytes > SINGLE_FILE_LIMIT,
            verbose=False,
        )


def quantize_int8(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Per-channel int8 weights for every MatMul that has a weight (not the activation x activation ones)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
    if not nodes:
        raise ValueError(f"{fp32_path}: no weight MatMul to quantise")
    quantize_dynamic(
        str(fp32_path), str(out_path), weight_type=QuantType.QInt8, nodes_to_quantize=nodes, per_channel=True
    )
    return Path(out_path)


def export_encoder(encoder: RetinaEncoder, path: str | Path, *, precision: str = "float32") -> Path:
    """Write `encoder` (LoRA merged if present) to `path` as ONNX in `precision`; returns the path.

    The weights may spill into a side file next to `path` when the graph exceeds the single-file limit; a
    bundle lists that file too.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {PRECISIONS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if precision == "int8":
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            _trace(encoder, fp32, fp16=False)
            quantize_int8(fp32, path)
    else:
        _trace(encoder, path, fp16=precision == "float16")
    log.info("exported %s (%s)", path, precision)
    return path
