"""Loading RETFound / RetiZero checkpoints with their real key layouts (on tiny ViTs of the same names)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from devtools.tiny_bundle import write_retfound_pth, write_retizero_pth
from grok_pacs.model.checkpoints import CheckpointError, load_encoder, load_retfound, load_retizero, save_encoder
from grok_pacs.model.config import EncoderConfig
from grok_pacs.model.vit import LoraQKV, apply_qkv_lora, build_encoder, has_lora

torch.set_num_threads(1)
CFG = EncoderConfig(embed_dim=32, depth=2, num_heads=2)
LORA_CFG = EncoderConfig(embed_dim=32, depth=2, num_heads=2, lora_rank=4)


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _outputs(encoder, x):
    with torch.no_grad():
        return encoder.eval()(x)


def test_encoder_gives_196_patch_tokens_and_their_mean():
    encoder = build_encoder(CFG)
    tokens, pooled = _outputs(encoder, _pixels())
    assert tokens.shape == (2, 196, 32) and pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, tokens.mean(1))
    torch.testing.assert_close(encoder.forward_tokens(_pixels()), tokens)


def test_retfound_pth_loads_with_decoder_keys_ignored(tmp_path):
    source = build_encoder(CFG)
    path = write_retfound_pth(source, tmp_path / "RETFound_oct_weights.pth")
    loaded = load_retfound(path, CFG)
    for a, b in zip(_outputs(source, _pixels()), _outputs(loaded, _pixels())):
        torch.testing.assert_close(a, b)


def test_retfound_backbone_prefix_is_remapped(tmp_path):
    source = build_encoder(CFG)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state}, tmp_path / "dino_style.pth")
    loaded = load_retfound(tmp_path / "dino_style.pth", CFG)
    torch.testing.assert_close(_outputs(source, _pixels())[1], _outputs(loaded, _pixels())[1])


def test_incomplete_retfound_checkpoint_names_the_missing_key(tmp_path):
    state = dict(build_encoder(CFG).state_dict())
    del state["blocks.1.attn.qkv.weight"]
    torch.save({"model": state}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.qkv\.weight"):
        load_retfound(tmp_path / "cut.pth", CFG)


def test_unexpected_key_is_an_error_not_silently_dropped(tmp_path):
    state = dict(build_encoder(CFG).state_dict())
    state["blocks.0.attn.gate.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.attn\.gate\.weight"):
        load_retfound(tmp_path / "extra.pth", CFG)


def test_checkpoint_of_another_width_reports_shape_mismatch(tmp_path):
    other = build_encoder(EncoderConfig(embed_dim=48, depth=2, num_heads=2))
    path = write_retfound_pth(other, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_retfound(path, CFG)


class _Payload:
    def __reduce__(self):
        return (print, ("pickle executed",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"model": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="not a weights-only torch checkpoint"):
        load_retfound(path, CFG)


def _lora_encoder() -> torch.nn.Module:
    encoder = apply_qkv_lora(build_encoder(LORA_CFG), 4)
    for module in encoder.modules():
        if isinstance(module, LoraQKV):
            torch.nn.init.normal_(module.linear_b_q.weight, std=0.1)
            torch.nn.init.normal_(module.linear_b_v.weight, std=0.1)
    return encoder


def test_retizero_loads_and_merged_lora_equals_unmerged(tmp_path):
    source = _lora_encoder()
    path = write_retizero_pth(source, tmp_path / "RetiZero.pth")
    unmerged = load_retizero(path, LORA_CFG, merge=False)
    merged = load_retizero(path, LORA_CFG)
    assert has_lora(unmerged) and not has_lora(merged)
    reference = _outputs(source, _pixels())
    for ref, a, b in zip(reference, _outputs(unmerged, _pixels()), _outputs(merged, _pixels())):
        torch.testing.assert_close(a, ref)
        torch.testing.assert_close(b, ref, atol=1e-4, rtol=1e-4)
    without_lora = copy.deepcopy(source)
    for block in without_lora.blocks:
        block.attn.qkv = block.attn.qkv.qkv
    assert not torch.allclose(_outputs(without_lora, _pixels())[1], reference[1]), "the LoRA must change the output"


def test_retizero_with_other_lora_rank_is_refused(tmp_path):
    path = write_retizero_pth(_lora_encoder(), tmp_path / "RetiZero.pth")
    with pytest.raises(CheckpointError, match="LoRA rank 4, config expects 8"):
        load_retizero(path, EncoderConfig(embed_dim=32, depth=2, num_heads=2, lora_rank=8))


def test_retfound_file_is_not_a_retizero_file(tmp_path):
    path = write_retfound_pth(build_encoder(CFG), tmp_path / "RETFound.pth")
    with pytest.raises(CheckpointError, match="no keys under 'vision_model.model.lora_vit.'"):
        load_retizero(path, LORA_CFG)


def test_safetensors_round_trip_and_auto_detection(tmp_path):
    merged = load_retizero(write_retizero_pth(_lora_encoder(), tmp_path / "RetiZero.pth"), LORA_CFG)
    saved = save_encoder(merged, tmp_path / "cfp.safetensors")
    again = load_encoder(saved)
    torch.testing.assert_close(_outputs(merged, _pixels())[0], _outputs(again, _pixels())[0])
    via_pth = load_encoder(tmp_path / "RetiZero.pth", LORA_CFG)
    torch.testing.assert_close(_outputs(merged, _pixels())[0], _outputs(via_pth, _pixels())[0])
    with pytest.raises(ValueError, match="merge the qkv LoRA"):
        save_encoder(_lora_encoder(), tmp_path / "unmerged.safetensors")


def test_checkpoint_at_another_resolution_gets_its_position_embedding_resampled(tmp_path):
    small = build_encoder(EncoderConfig(img_size=112, embed_dim=32, depth=2, num_heads=2))
    path = write_retfound_pth(small, tmp_path / "r112.pth")
    loaded = load_retfound(path, CFG)
    assert loaded.pos_embed.shape == (1, 197, 32)
    torch.testing.assert_close(loaded.cls_token, small.cls_token)
