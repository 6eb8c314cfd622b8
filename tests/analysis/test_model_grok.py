"""GrokModel (splice, loss masking, training, generation), projectors, biomarker heads and the prompt."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from devtools.tiny_bundle import TINY_REPORT, train_tokenizer
from grok_pacs.domain.biomarkers import BIOMARKERS, BY_KEY, CFP_KEYS, OCT_KEYS
from grok_pacs.model.config import GrokConfig, ProjectorConfig
from grok_pacs.model.grok import GrokModel
from grok_pacs.model.heads import BiomarkerHead, grid_cells, head_input
from grok_pacs.model.projector import Projectors
from grok_pacs.model.prompt import (
    IGNORE_INDEX,
    IM_END,
    IMAGE_TOKEN,
    INSTRUCTION,
    SYSTEM_PROMPT,
    biomarker_block,
    build_prompt,
    build_training_example,
    format_target,
    human_turn,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    config = GrokConfig.tiny(vocab_size=64 * math.ceil(len(tokenizer) / 64))
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=config.llm.vocab_size,
            hidden_size=config.llm.hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=config.llm.intermediate_size,
            tie_word_embeddings=False,
        )
    )
    return GrokModel(llm, Projectors(config.projector), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def _tokens(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 196, 32, generator=torch.Generator().manual_seed(seed))


def test_prompt_is_chatml_with_the_papers_turns():
    prompt = build_prompt()
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{IMAGE_TOKEN}\n")
    assert INSTRUCTION in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count(IMAGE_TOKEN) == 1


def test_biomarker_block_lists_values_first_then_the_qualitative_reading():
    values = {b.key: float(np.mean(b.normal)) for b in BIOMARKERS}
    values["rnfl_average"] = 18.0
    values["cup_to_disc"] = 0.81
    block = biomarker_block(values)
    assert block.index("(quantitative)") < block.index("(qualitative)")
    assert "Average retinal nerve fibre layer (RNFL) thickness 18.0 um" in block
    assert "cup-to-disc ratio 0.810" in block
    qualitative = block[block.index("(qualitative)") :]
    assert "Below normal: Average retinal nerve fibre layer (RNFL) thickness." in qualitative
    assert "Above normal: cup-to-disc ratio." in qualitative
    assert biomarker_block({}) == "" and "Biomarker" not in human_turn({})


def test_missing_modality_is_said_in_the_prompt():
    assert "No OCT volume (OCT) is available for this eye." in human_turn(missing=("OCT",))
    with pytest.raises(ValueError, match="unknown modality"):
        human_turn(missing=("MRI",))


def test_target_is_one_paragraph_then_the_diagnosis_line():
    assert format_target("Disc normal.\n\nMacula flat.", "Normal") == "Disc normal. Macula flat.\nDiagnosis: Normal"
    with pytest.raises(ValueError):
        format_target("x", "Indeterminate")
    with pytest.raises(ValueError):
        format_target("x", "Cataract")


def test_training_example_puts_loss_on_the_assistant_reply_only(tokenizer):
    ex = build_training_example(tokenizer, TINY_REPORT, biomarkers={"rnfl_average": 20.0})
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]
    assert tokenizer.decode(ex.input_ids[:first]) == build_prompt({"rnfl_average": 20.0})
    assert tokenizer.decode(ex.labels[first:]) == TINY_REPORT + IM_END
    assert not ex.truncated


def test_training_example_truncates_the_answer_never_the_prompt(tokenizer):
    prompt_len = len(tokenizer(build_prompt(), add_special_tokens=False)["input_ids"])
    ex = build_training_example(tokenizer, TINY_REPORT, max_length=prompt_len + 392 + 5)
    assert ex.truncated and len(ex.input_ids) == prompt_len + 6
    with pytest.raises(ValueError, match="leaves no room"):
        build_training_example(tokenizer, TINY_REPORT, max_length=300)


def test_splice_puts_392_visual_embeddings_at_the_image_token(model, tokenizer):
    ex = build_training_example(tokenizer, TINY_REPORT)
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    spliced = model.splice(ids, None, labels, _tokens(), _tokens(seed=1))
    assert spliced["inputs_embeds"].shape == (1, ids.shape[1] - 1 + 392, 128)
    pos = ex.input_ids.index(model.image_token_id)
    expected = model.projectors.project_cfp(_tokens()[0])
    torch.testing.assert_close(spliced["inputs_embeds"][0, pos : pos + 196], expected)
    assert (spliced["labels"][0, : pos + 392] == IGNORE_INDEX).all()
    assert spliced["labels"][0, pos + 392 :].tolist() == ex.labels[pos + 1 :]


def test_missing_modality_uses_one_learned_placeholder(model, tokenizer):
    ids = torch.tensor([tokenizer(build_prompt(missing=("OCT",)), add_special_tokens=False)["input_ids"]])
    spliced = model.splice(ids, None, None, _tokens(), None)
    assert spliced["inputs_embeds"].shape[1] == ids.shape[1] - 1 + 196 + 1
    pos = ids[0].tolist().index(model.image_token_id)
    torch.testing.assert_close(spliced["inputs_embeds"][0, pos + 196], model.projectors.missing_oct[0])


def test_exactly_one_image_token_is_required(model, tokenizer):
    ids = torch.tensor([tokenizer("<image> and <image>", add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match="2 <image> tokens"):
        model(ids, cfp_tokens=_tokens(), oct_tokens=_tokens())


def test_training_steps_lower_the_loss_and_reach_llm_and_projectors(model, tokenizer):
    ex = build_training_example(tokenizer, TINY_REPORT)
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=labels, cfp_tokens=_tokens(), oct_tokens=_tokens(seed=1)).loss
        optimiser.zero_grad()
        loss.backward()
        if not losses:
            assert model.projectors.cfp[0].weight.grad.abs().sum() > 0
            assert model.projectors.oct[0].weight.grad.abs().sum() > 0
            assert model.llm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


def test_batched_generation_equals_one_by_one(model, tokenizer):
    model.eval()
    prompts = [
        tokenizer(build_prompt(), add_special_tokens=False)["input_ids"],
        tokenizer(build_prompt({"cup_to_disc": 0.7}, ("OCT",)), add_special_tokens=False)["input_ids"],
    ]
    cfp, oct_tokens = _tokens(2), [_tokens(seed=3)[0], None]
    single = [
        model.generate(torch.tensor([p]), cfp_tokens=cfp[i : i + 1], oct_tokens=[oct_tokens[i]], max_new_tokens=6)
        for i, p in enumerate(prompts)
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, mask, cfp_tokens=cfp, oct_tokens=oct_tokens, max_new_tokens=6)
    assert batched.shape == (2, 6)
    for i in range(2):
        assert batched[i].tolist() == single[i][0].tolist()


def test_projectors_round_trip_and_refuse_other_shapes(tmp_path):
    config = GrokConfig.tiny()
    projectors = Projectors(config.projector)
    path = projectors.save(tmp_path / "projectors.safetensors")
    again = Projectors.load(path, config.projector)
    x = _tokens()[0]
    torch.testing.assert_close(again.project_oct(x), projectors.project_oct(x))
    with pytest.raises(ValueError, match="shape mismatch"):
        Projectors.load(path, ProjectorConfig(vision_dim=32, llm_hidden_size=96))


def test_ridge_head_recovers_a_linear_relation_in_biomarker_units(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 16))
    true_w = rng.normal(size=(len(OCT_KEYS), 16)) * 5
    true_b = np.array([np.mean(BY_KEY[k].normal) for k in OCT_KEYS])
    targets = features @ true_w.T + true_b
    targets[:50, 3] = np.nan  # missing values are skipped, not zero
    head = BiomarkerHead.fit_ridge("OCT", features, targets, alpha=1e-3)
    np.testing.assert_allclose(head.predict(features[:5]), (features[:5] @ true_w.T + true_b), atol=1e-2)
    path = head.save(tmp_path / "oct_head.safetensors")
    again = BiomarkerHead.load(path)
    values = again.predict_dict(features[0])
    assert list(values) == list(OCT_KEYS)
    assert values["rnfl_average"] == pytest.approx(float(features[0] @ true_w[-1] + true_b[-1]), abs=1e-2)


def test_head_from_torch_weights_and_shape_errors():
    head = BiomarkerHead.from_ridge("CFP", torch.ones(len(CFP_KEYS), 4), torch.zeros(len(CFP_KEYS)))
    assert head.predict(np.ones(4)).tolist() == [4.0] * 6
    with pytest.raises(ValueError, match=r"weight \[6, D\]"):
        BiomarkerHead.from_ridge("CFP", np.ones((5, 4)), np.zeros(5))
    with pytest.raises(ValueError, match="expects 4-d features"):
        head.predict(np.ones(3))


def test_head_saved_from_a_transposed_weight_reloads_identically(tmp_path):
    """Ridge solvers often return W^T views; the saved head must not come back scrambled."""
    rng = np.random.default_rng(1)
    weight = np.asfortranarray(rng.normal(size=(len(CFP_KEYS), 8)))  # non-C-contiguous
    head = BiomarkerHead.from_ridge("CFP", weight, np.arange(len(CFP_KEYS), dtype=float))
    again = BiomarkerHead.load(head.save(tmp_path / "cfp.safetensors"))
    x = rng.normal(size=(3, 8))
    np.testing.assert_allclose(again.predict(x), head.predict(x), rtol=1e-5)


def test_grid_cells_are_the_adaptive_average_pool_of_the_patch_grid():
    tokens = torch.randn(3, 196, 8)
    cells = grid_cells(tokens, 4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(tokens.reshape(3, 14, 14, 8).permute(0, 3, 1, 2), 4)
    expected = pooled.permute(0, 2, 3, 1).reshape(3, 16 * 8)  # cells row-major, each cell's D values together
    np.testing.assert_allclose(cells, expected.double().numpy(), atol=1e-6)
    assert head_input(tokens.mean(1), tokens, 4).shape == (3, 17 * 8)
    with pytest.raises(ValueError, match="square patch grid"):
        grid_cells(torch.randn(1, 195, 8), 4)


def test_a_grid_head_reads_where_a_pooled_head_cannot(tmp_path):
    """A biomarker that differs between the two halves of the image (a sector thickness, a cup's place) is
    invisible to the mean token and exact from a 2x2 grid of cells."""
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(400, 196, 4))
    left = tokens.reshape(400, 14, 14, 4)[:, :, :7, 0].mean(axis=(1, 2))
    right = tokens.reshape(400, 14, 14, 4)[:, :, 7:, 0].mean(axis=(1, 2))
    targets = np.tile(np.array([np.mean(BY_KEY[k].normal) for k in CFP_KEYS]), (400, 1))
    targets[:, 0] += 10 * (left - right)  # the mean token holds (left + right) / 2 only
    pooled = tokens.mean(axis=1)
    errors = {}
    for grid in (0, 2):
        head = BiomarkerHead.fit_ridge("CFP", head_input(pooled, tokens, grid), targets, alpha=1e-3)
        head = BiomarkerHead(head.modality, head.weight, head.bias, grid)
        again = BiomarkerHead.load(head.save(tmp_path / f"cfp-{grid}.safetensors"))
        assert again.grid == grid and again.feature_dim == again.input_dim(4)
        estimates = np.array([again.estimate(pooled[i], tokens[i])[CFP_KEYS[0]] for i in range(300, 400)])
        errors[grid] = float(np.abs(estimates - targets[300:, 0]).mean())
    assert errors[2] < 0.01 < 0.3 < errors[0]
    with pytest.raises(ValueError, match="needs the patch tokens"):
        again.estimate(pooled[0])


def test_a_head_saved_before_the_grid_loads_as_pooled_only(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "old-head.safetensors"
    weight, bias = np.ones((len(CFP_KEYS), 4), np.float32), np.zeros(len(CFP_KEYS), np.float32)
    meta = {"format": "grok-pacs-biomarker-head/1", "modality": "CFP", "keys": json.dumps(list(CFP_KEYS))}
    save_file({"weight": weight, "bias": bias}, str(path), metadata=meta)
    head = BiomarkerHead.load(path)
    assert head.grid == 0 and head.estimate(np.ones(4))[CFP_KEYS[0]] == 4.0


def test_pooled_projectors_average_the_patch_grid_and_splice_fewer_tokens() -> None:
    """CPU presets pool each modality's 14 x 14 patch tokens to k x k (ProjectorConfig.token_grid)."""
    cfg = ProjectorConfig(vision_dim=8, llm_hidden_size=16, token_grid=2)
    projectors = Projectors(cfg)
    tokens = torch.randn(196, 8)
    pooled = projectors.pool(tokens)
    grid = tokens.reshape(14, 14, 8)
    assert pooled.shape == (4, 8)
    assert torch.allclose(pooled[0], grid[:7, :7].mean(dim=(0, 1)), atol=1e-6)  # top-left quadrant
    assert torch.allclose(pooled[3], grid[7:, 7:].mean(dim=(0, 1)), atol=1e-6)  # bottom-right quadrant
    assert projectors.visual_embeddings(tokens, tokens).shape == (8, 16)
    assert projectors.visual_embeddings(tokens, None).shape == (5, 16)  # a missing modality stays one placeholder
    assert Projectors(ProjectorConfig(vision_dim=8, llm_hidden_size=16)).pool(tokens) is tokens  # paper: all 196
    with pytest.raises(ValueError, match="square"):
        projectors.pool(torch.randn(195, 8))


def test_compact_biomarker_block_lists_the_signature_signs_and_every_abnormal_estimate() -> None:
    from grok_pacs.domain.biomarkers import PROSE_NAMES
    from grok_pacs.model.prompt import COMPACT_KEYS, biomarker_block, build_prompt, compact_biomarker_block

    values = {b.key: sum(b.normal) / 2 for b in BIOMARKERS}
    values["cup_to_disc"], values["rnfl_average"] = 0.75, 15.8
    block = compact_biomarker_block(values)
    assert "cup-to-disc ratio 0.750 (high)" in block and "RNFL thickness 15.8 (low)" in block
    assert all(PROSE_NAMES[key] in block for key in COMPACT_KEYS)
    assert PROSE_NAMES["disc_diameter_vertical"] not in block  # normal and not a signature sign: left out
    assert block.endswith("All other estimates are normal.")
    assert block.count("(low)") + block.count("(high)") == 2
    assert len(block) < 0.5 * len(biomarker_block(values))
    assert block in build_prompt(values, compact=True) and block not in build_prompt(values)
    values["disc_diameter_vertical"] = 2900.0  # abnormal: listed even though it is not a signature sign
    assert "Also outside normal limits: vertical disc diameter 2900.0 (high)." in compact_biomarker_block(values)
    assert compact_biomarker_block({}) == ""


def test_compact_keys_are_the_guideline_signature_signs() -> None:
    """The compact prompt always shows the numbers a guideline report reasons from, for every label."""
    from grok_pacs.model.prompt import COMPACT_KEYS
    from training.stage1.teachers.knowledge import load_knowledge

    signs = {sign.key for lk in load_knowledge().labels.values() for sign in lk.signature}
    assert set(COMPACT_KEYS) == signs and len(COMPACT_KEYS) == len(signs)
