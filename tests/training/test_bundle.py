"""The model bundle: built through export, ONNX parity within tolerance, tampered / incomplete bundles refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from devtools.tiny_bundle import copy_bundle
from export.onnx_export import export_encoder
from export.parity import ParityError, Tolerance, check_encoder_parity, measure_encoder_parity
from grok_pacs.analysis.bundle import CFP_ENCODER, MANIFEST, OCT_HEAD, BundleError, load_bundle
from grok_pacs.analysis.onnx_session import create_session, run_encoder
from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from grok_pacs.model.config import EncoderConfig
from grok_pacs.model.vit import build_encoder

torch.set_num_threads(1)


def test_tiny_bundle_manifest_describes_the_model(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    manifest = bundle.manifest
    assert (bundle.name, bundle.version, bundle.layout) == ("grok-tiny", "0.0.1-test", "merged")
    assert manifest["labels"] == [label.value for label in DIAGNOSTIC_LABELS]
    assert [(b["key"], b["unit"]) for b in manifest["biomarkers"]] == [(b.key, b.unit) for b in BIOMARKERS]
    assert manifest["prompt"]["system"] == "You are a helpful assistant."
    assert manifest["provenance"]["training_data"].startswith("none")
    assert manifest["created"].endswith("+00:00")
    for key in ("cfp", "oct"):
        parity = manifest["encoders"][key]["parity"]
        assert parity["passed"] and parity["max_abs"] <= parity["tolerance"]["max_abs"]
    listed = set(manifest["files"])
    assert {CFP_ENCODER, OCT_HEAD, "projectors.safetensors", "llm/config.json", "tokenizer/tokenizer.json"} <= listed
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in listed)


def test_encoder_onnx_has_a_dynamic_batch_axis(tiny_bundle):
    session = create_session(tiny_bundle / CFP_ENCODER)
    for batch in (1, 3):
        tokens, pooled = run_encoder(session, np.zeros((batch, 3, 224, 224), np.float32))
        assert tokens.shape == (batch, 196, 32) and pooled.shape == (batch, 32)


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_onnx_parity_within_tolerance(tmp_path, precision):
    encoder = build_encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2))
    path = export_encoder(encoder, tmp_path / "enc.onnx", precision=precision)
    result = check_encoder_parity(encoder, path, dtype=precision, batch_sizes=(1, 2))
    assert result.passed and 0 <= result.max_abs <= result.tolerance.max_abs and result.cosine >= 0.999
    assert "max abs diff" in str(result) and "cosine" in str(result)


def test_parity_fails_when_the_export_drifts(tmp_path):
    encoder = build_encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2))
    path = export_encoder(encoder, tmp_path / "enc.onnx")
    with torch.no_grad():
        encoder.blocks[1].mlp.fc2.bias[:8] += 0.5  # torch changes after export: the ONNX file is now stale
    with pytest.raises(ParityError, match="FAILED"):
        check_encoder_parity(encoder, path)
    strict = measure_encoder_parity(
        build_encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2)),
        path,
        tolerance=Tolerance(max_abs=0.0, min_cosine=1.0),
    )
    assert not strict.passed


def _flip_byte(path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_file_is_refused_by_name(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    _flip_byte(bundle / OCT_HEAD)
    with pytest.raises(BundleError, match=r"heads/oct_head\.safetensors has been modified"):
        load_bundle(bundle)


def test_missing_file_is_refused_by_name(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"incomplete: tokenizer/tokenizer\.json is missing"):
        load_bundle(bundle)


def test_unlisted_file_and_edited_manifest_are_refused(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / "llm" / "adapter_model.safetensors").write_bytes(b"extra")
    with pytest.raises(BundleError, match=r"llm/adapter_model\.safetensors is not in the manifest"):
        load_bundle(bundle)
    bundle = copy_bundle(tiny_bundle, tmp_path / "c")
    manifest = json.loads((bundle / MANIFEST).read_text())
    del manifest["files"][CFP_ENCODER]
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"encoders/cfp_encoder\.onnx is not in the manifest"):
        load_bundle(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(bundle)


def test_cli_verify_accepts_the_bundle_and_refuses_a_tampered_copy(tiny_bundle, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "export", "verify", str(tiny_bundle)], capture_output=True, text=True)
    assert ok.returncode == 0 and "grok-tiny 0.0.1-test" in ok.stdout
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    _flip_byte(bundle / CFP_ENCODER, 2000)
    bad = subprocess.run([sys.executable, "-m", "export", "verify", str(bundle)], capture_output=True, text=True)
    assert bad.returncode == 1 and "encoders/cfp_encoder.onnx has been modified" in bad.stderr
    helptext = subprocess.run([sys.executable, "-m", "export", "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0 and "parity" in helptext.stdout
