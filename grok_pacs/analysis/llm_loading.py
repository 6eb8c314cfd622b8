"""Where and how the engine's language model runs: the device ("auto" picks CUDA only when both torch and
onnxruntime see it) and the bundle's Qwen2 loaded with its LoRA merged, in the precision asked for.
"""

from __future__ import annotations

import torch

from grok_pacs.analysis.bundle import Bundle
from grok_pacs.analysis.onnx_session import cuda_available
from grok_pacs.model.precision import torch_dtype


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch and onnxruntime both see CUDA, else "cpu"."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    return device


def load_llm(bundle: Bundle, device: str, precision: str = "fp32") -> torch.nn.Module:
    """The bundle's Qwen2, LoRA merged (merging a base + adapter bundle here), in eval mode on `device`, its
    weights in `precision` ("bf16" or "fp32", resolved by grok_pacs.model.precision)."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(precision)
    llm = bundle.manifest["llm"]
    if bundle.layout == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(bundle.path(llm["dir"])), local_files_only=True, dtype=dtype)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            str(bundle.path(llm["base_dir"])), local_files_only=True, dtype=dtype
        )
        model = PeftModel.from_pretrained(base, str(bundle.path(llm["adapter_dir"]))).merge_and_unload()
    return model.to(device).eval()
