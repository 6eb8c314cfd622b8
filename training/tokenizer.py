"""Tokenizers for stage 3: the real Qwen2 tokenizer from a local directory, or a small BPE for the phantom.

A pretrained Qwen2 cannot be brought onto these machines, so the phantom pipeline trains its own byte-level
BPE (the same kind of model as Qwen2's) on the instruction corpus, with the ChatML special tokens and the
`<image>` placeholder as single tokens. Both kinds are saved and loaded as ordinary transformers tokenizer
directories, so the runtime (`grok_pacs.analysis.engine`) and the bundle treat them alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
#: Special tokens every grok tokenizer has, in id order for the phantom BPE (ids 0..3).
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN)

#: Qwen2-Instruct's ChatML template (default system prompt "You are a helpful assistant.").
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(RuntimeError):
    """A tokenizer directory that cannot serve grok (missing files or special tokens)."""


def train_bpe(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, phrases: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with the ChatML special tokens and `<image>` as ids 0-3.

    Byte-level means any text can be encoded (no unknown token), like Qwen2's tokenizer. With `phrases`
    (the phantom default) merges may cross spaces, so frequent phrases of the reports and of the biomarker
    block ("central subfield thickness of ") become single tokens, while digit runs are always split off
    as their own pieces: sequences are about three times shorter than with word-level pieces, and every
    number is spelled by the same tokens in the prompt and in the report, right after a token that names
    its biomarker, which is what a tiny model needs to learn to cite the estimates it is given. With
    `phrases=False` it pre-tokenizes like GPT-2 / Qwen2 (word-level pieces).
    """
    tok = Tokenizer(models.BPE())
    if phrases:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=48 if phrases else None,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return _wrap(tok)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    count = 0
    for text in texts:
        if text:
            count += 1
            yield text
    if count == 0:
        raise TokenizerError("cannot train a BPE tokenizer on an empty corpus")


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IMAGE_TOKEN],
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def corpus_from_instructions(jsonl_paths: Iterable[Path]) -> Iterator[str]:
    """Every conversation turn of stage-1 instruction JSONL files (the paper's record format)."""
    for path in jsonl_paths:
        with Path(path).open() as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TokenizerError(f"{path}:{line_no}: not JSON: {exc}") from exc
                for turn in record.get("conversations", []):
                    yield str(turn.get("value", ""))


def train_phantom_tokenizer(
    jsonl_paths: Iterable[Path], out_dir: Path, vocab_size: int = 4096, extra_texts: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """Train the phantom BPE on the instruction corpus (plus `extra_texts`) and save it to `out_dir`."""

    def texts() -> Iterator[str]:
        yield from corpus_from_instructions(jsonl_paths)
        yield from extra_texts
        # The system prompt and the ChatML role names must tokenize compactly too.
        yield "system\nYou are a helpful assistant.\nuser\nassistant\n"

    tokenizer = train_bpe(texts(), vocab_size=vocab_size)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory (a real Qwen2's or the phantom BPE), ready for grok prompts.

    Never reaches a hub. A real Qwen2 tokenizer has no `<image>` token: it is added as a special token
    (the caller must then resize the LLM's embeddings to `len(tokenizer)`). The ChatML template is set
    when the directory has none.
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise TokenizerError(f"{path} has no tokenizer.json or vocab.json: not a tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        raise TokenizerError(f"tokenizer at {path} lacks the ChatML special tokens {missing}")
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT if ENDOFTEXT in vocab else IM_END
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise TokenizerError(f"tokenizer has no {IMAGE_TOKEN} token")
    return int(token_id)
