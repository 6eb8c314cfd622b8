"""The LLM's float type (grok_pacs.model.precision): bf16 only where the hardware multiplies it natively."""

from __future__ import annotations

import pytest
import torch

from grok_pacs.config import Settings
from grok_pacs.model.precision import cpu_has_amx_bf16, resolve_precision, torch_dtype

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ICE_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"


def test_amx_is_read_from_the_cpu_flags() -> None:
    assert cpu_has_amx_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_has_amx_bf16(ICE_LAKE)
    assert not cpu_has_amx_bf16("bugs\t\t: amx_bf16\n")  # only the flags line counts


def test_the_runtime_is_fp32_on_a_cpu_unless_a_site_forces_bf16() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"  # even with AMX: batched rows stay exact
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert (torch_dtype("bf16"), torch_dtype("fp32")) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_the_site_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROK_PACS_LLM_PRECISION", "fp32")
    assert Settings().llm_precision == "fp32"
    monkeypatch.setenv("GROK_PACS_LLM_PRECISION", "half")
    with pytest.raises(ValueError, match="llm_precision"):
        Settings()
