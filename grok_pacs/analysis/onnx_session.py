"""onnxruntime sessions for the encoders, configured for a process that also runs torch (docs/domain.md, Library facts).

CUDA provider only when CUDA is really present (asking for it otherwise logs an error); no spin-waiting
after a run, since idle spinning ORT threads slow torch's generation in the same process many-fold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cuda_available() -> bool:
    """CUDA usable by torch (the LLM) and an onnxruntime build with the CUDA provider."""
    import torch

    return torch.cuda.is_available() and CUDA in ort.get_available_providers()


def providers_for(device: str) -> list[str]:
    """['CUDAExecutionProvider', 'CPUExecutionProvider'] on a CUDA device when usable, else CPU only."""
    if device.startswith("cuda"):
        if CUDA not in ort.get_available_providers():
            raise RuntimeError(f"device {device!r} asked for, but this onnxruntime build has no {CUDA}")
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA / cuDNN from the NVIDIA pip packages torch brings
        return [CUDA, CPU]
    return [CPU]


def create_session(path: str | Path, device: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    """A session for `path` on `device` ("cpu" or "cuda[:N]"); threads=0 lets onnxruntime choose."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=providers_for(device))


def run_encoder(session: ort.InferenceSession, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pixels [B,3,H,W] float32 -> (tokens [B,N,D], pooled [B,D]) as float32."""
    name = session.get_inputs()[0].name
    tokens, pooled = session.run(None, {name: np.ascontiguousarray(pixels, dtype=np.float32)})
    return tokens.astype(np.float32, copy=False), pooled.astype(np.float32, copy=False)
