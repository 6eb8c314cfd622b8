"""Which float type the language model runs in.

A CUDA GPU with bf16 support, and a CPU with AMX bf16 tiles (Intel Sapphire Rapids and later), multiply bf16
matrices natively; elsewhere bf16 is emulated and slower than fp32.

- Runtime (`resolve_precision`, site setting `llm_precision`): "auto" is bf16 on such a GPU and fp32 on every
  CPU. On an AMX CPU "bf16" may be forced: an eye then costs about 2/3 (3.2 s instead of 4.7 s for SmolLM2 on 2
  cores, the same labels on 16 validation eyes), but as on a GPU a row of a padded two-eye batch is no longer
  bit-identical to the eye run alone: where two tokens nearly tie, the batch's rounding can pick the other.
- Training (stage 3's CPU preset, `cpu_precision`): bf16 autocast on an AMX CPU, fp32 master weights, as mixed
  precision always trains.
No torch import at module level: `training.stage3.config` reads this without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "bf16", "fp32")
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_amx_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX bf16 tiles (the `amx_bf16` flag of /proc/cpuinfo; False where it is unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return any(
        line.startswith("flags") and "amx_bf16" in line.split(":", 1)[-1].split() for line in cpuinfo.splitlines()
    )


def cpu_precision() -> str:
    """The CPU's native choice: "bf16" where it multiplies bf16 natively (AMX), else "fp32"."""
    return "bf16" if cpu_has_amx_bf16() else "fp32"


def resolve_precision(precision: str, device: str) -> str:
    """ "bf16" or "fp32" for the runtime's LLM on `device` ("cpu", "cuda", "cuda:1")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"  # every CPU: fp32 rows of a batch equal the eyes run alone (see above)


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a resolved precision ("bf16" or "fp32")."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
