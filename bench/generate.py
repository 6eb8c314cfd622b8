"""Generation speed: Qwen2 with a LoRA adapter merged (merge_and_unload) vs unmerged (PEFT), tokens/s.

The paper's adapter is LoRA r=128, alpha=256 on q/k/v/o/gate/up/down. A 7B model does not fit this
project's CPU budget, so the CPU run uses Qwen2-0.5B shapes (same architecture; random weights, speed does
not depend on them); `--preset 7b --device cuda` is the GPU path (bf16). Greedy decoding of a fixed number
of tokens (EOS disabled) after a prompt of fixed length; runs interleaved, medians reported.
Writes bench/results/generate.json with tokens/s for both and merged_over_unmerged.

  python -m bench.generate                          # CPU, Qwen2-0.5B shapes
  python -m bench.generate --preset 7b --device cuda  # GPU path; not run on CPU-only machines

Two-eye mode: a study's two eyes through the runtime engine in ONE batched generation and label scoring,
against one eye alone (and against the two eyes one after the other, as before batching). Bundles: the
tiny test bundle (always) and any `--bundle DIR` (e.g. the phantom pipeline's). Writes
bench/results/generate_two_eye.json with, per bundle, medians and two_eye_over_one_eye for generation
(generate + label scoring) and for the whole analysis (encoders run once per image, so they scale).

  python -m bench.generate --two-eye [--bundle DIR ...] [--shapes smollm2-135m --prompt-tokens 700 --new-tokens 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]

#: Qwen2 shapes (config.json of the public checkpoints).
PRESETS = {
    "0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
    ),
    "7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(preset: str, rank: int, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**PRESETS[preset], max_position_embeddings=4096, tie_word_embeddings=preset == "0.5b")
    base = Qwen2ForCausalLM(config).to(dtype)
    unmerged = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=TARGETS))
    for name, param in unmerged.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    merged = copy.deepcopy(unmerged).merge_and_unload()
    return unmerged.to(device).eval(), merged.to(device).eval()


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    if prompt.is_cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - start


def _eye_images(seed: int):
    """Synthetic pixels of one eye (fundus-like CFP, layered OCT): prompts differ per eye, like a study's."""
    from devtools.sample_dicom import fundus_rgb, oct_volume_array
    from grok_pacs.analysis.imaging import EyeImages

    eye = "R" if seed % 2 == 0 else "L"
    return EyeImages(eye, fundus_rgb(512, eye, seed=seed), oct_volume_array(16, 128, 128, seed=seed))


def _run(engine, eyes) -> dict:
    start = time.perf_counter()
    reports = engine.analyze_batch(eyes)
    wall = time.perf_counter() - start
    timings = reports[0].timings_s
    return {
        "analysis_s": wall,
        "generation_s": timings["generate"] + timings.get("label_scores", 0.0),
        "new_tokens": [len(engine.tokenizer(r.raw_text, add_special_tokens=False)["input_ids"]) for r in reports],
        "passed_validation": [r.narrative_check.passed for r in reports],
    }


def two_eye(bundle: Path, repeats: int, threads: int) -> dict:
    """Medians of one eye, two eyes batched and two eyes one after the other, for one bundle."""
    from grok_pacs.analysis.engine import Engine

    engine = Engine.from_bundle(bundle, device="cpu", threads=threads)
    right, left = _eye_images(0), _eye_images(1)
    _run(engine, [right]), _run(engine, [right, left])  # warm-up
    runs: dict[str, list[dict]] = {"one_eye": [], "two_eyes_batched": [], "two_eyes_sequential": []}
    for _ in tqdm(range(repeats), desc=f"two-eye {engine.bundle.name}", unit="round"):
        runs["one_eye"].append(_run(engine, [right]))
        runs["two_eyes_batched"].append(_run(engine, [right, left]))
        first, second = _run(engine, [right]), _run(engine, [left])
        runs["two_eyes_sequential"].append({k: first[k] + second[k] for k in first})
    med = {
        name: {key: statistics.median(r[key] for r in rows) for key in ("analysis_s", "generation_s")}
        for name, rows in runs.items()
    }
    best = {name: min(r["generation_s"] for r in rows) for name, rows in runs.items()}  # least disturbed by load
    return {
        "bundle": engine.bundle.name,
        "version": engine.bundle.version,
        "path": str(bundle),
        "llm": engine.config.llm.__dict__,
        "medians_s": med,
        "new_tokens_two_eyes": runs["two_eyes_batched"][-1]["new_tokens"],
        "passed_validation_two_eyes": runs["two_eyes_batched"][-1]["passed_validation"],
        "generation_two_eye_over_one_eye": med["two_eyes_batched"]["generation_s"] / med["one_eye"]["generation_s"],
        "analysis_two_eye_over_one_eye": med["two_eyes_batched"]["analysis_s"] / med["one_eye"]["analysis_s"],
        "sequential_generation_over_one_eye": (
            med["two_eyes_sequential"]["generation_s"] / med["one_eye"]["generation_s"]
        ),
        "fastest_generation_s": best,
        "fastest_generation_two_eye_over_one_eye": best["two_eyes_batched"] / best["one_eye"],
        "runs": runs,
    }


def shapes_two_eye(preset: str, prefix: int, new_tokens: int, repeats: int, device: str) -> dict:
    """Decode `new_tokens` after `prefix` input embeddings (the spliced prompt), one row vs two rows (the
    second 40 shorter, left-padded), at a preset's shapes with random weights (speed does not depend on
    them); the runtime's no-repeat n-gram guard on. What batching buys once decode dominates."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grok_pacs.model.config import GenerationConfig

    torch.manual_seed(0)
    llm = (
        Qwen2ForCausalLM(
            Qwen2Config(**PRESETS[preset], max_position_embeddings=4096, tie_word_embeddings=preset != "7b")
        )
        .to(device)
        .eval()
    )
    embeds = torch.randn(2, prefix, PRESETS[preset]["hidden_size"], device=device) * 0.02
    mask = torch.ones(2, prefix, dtype=torch.long, device=device)
    mask[1, :40] = 0  # the other eye's prompt is shorter: left padding

    def seconds(rows: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = llm.generate(
                inputs_embeds=embeds[:rows],
                attention_mask=mask[:rows],
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                no_repeat_ngram_size=GenerationConfig().no_repeat_ngram_size,
            )
        assert out.shape == (rows, new_tokens)
        return time.perf_counter() - start

    seconds(1), seconds(2)  # warm-up
    runs = {"one_eye": [], "two_eyes_batched": []}
    for _ in tqdm(range(repeats), desc=f"two-eye {preset} shapes", unit="round"):
        runs["one_eye"].append(seconds(1))
        runs["two_eyes_batched"].append(seconds(2))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "preset": preset,
        "shapes": PRESETS[preset],
        "prefix_embeddings": prefix,
        "new_tokens": new_tokens,
        "medians_s": med,
        "generation_two_eye_over_one_eye": med["two_eyes_batched"] / med["one_eye"],
        "fastest_generation_two_eye_over_one_eye": min(runs["two_eyes_batched"]) / min(runs["one_eye"]),
        "seconds": runs,
    }


def main_two_eye(args: argparse.Namespace, threads: int) -> int:
    from devtools.bundle_cache import CACHE_ROOT, cached_tiny_bundle

    bundles = [cached_tiny_bundle(CACHE_ROOT), *args.bundle]
    results = [two_eye(Path(b), args.repeats, threads) for b in bundles]
    shapes = [shapes_two_eye(p, args.prompt_tokens, args.new_tokens, args.repeats, args.device) for p in args.shapes]
    out = args.out if args.out != DEFAULT_OUT else ROOT / "bench" / "results" / "generate_two_eye.json"
    result = {
        "what": "a study's two eyes in one batched generation + label scoring vs one eye (runtime engine, "
        "greedy, guards on); generation = generate + label scoring, analysis = the whole engine call",
        "device": "cpu",
        "threads": threads,
        "repeats": args.repeats,
        "load_average_at_end": os.getloadavg()[0],
        "bundles": results,
        "shapes": shapes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                r["bundle"]: {
                    k: round(r[k], 3)
                    for k in (
                        "generation_two_eye_over_one_eye",
                        "fastest_generation_two_eye_over_one_eye",
                        "analysis_two_eye_over_one_eye",
                        "sequential_generation_over_one_eye",
                    )
                }
                for r in results
            }
            | {f"{r['preset']} shapes": round(r["generation_two_eye_over_one_eye"], 3) for r in shapes}
        )
    )
    return 0


DEFAULT_OUT = ROOT / "bench" / "results" / "generate.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.5b", help="Qwen2 shapes (default 0.5b)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (paper: 128)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--two-eye", action="store_true", help="two eyes batched vs one eye through the engine")
    parser.add_argument(
        "--bundle",
        type=Path,
        action="append",
        default=[],
        help="--two-eye: a bundle to measure besides the tiny test bundle (repeatable)",
    )
    parser.add_argument(
        "--shapes",
        action="append",
        default=[],
        choices=sorted(PRESETS),
        help="--two-eye: also decode --new-tokens after --prompt-tokens embeddings at these shapes "
        "(random weights), one row vs two",
    )
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.two_eye:
        return main_two_eye(args, threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    unmerged, merged = build(args.preset, args.rank, args.device, dtype)
    prompt = torch.randint(10, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(
        args.device
    )
    decode_seconds(merged, prompt, 2), decode_seconds(unmerged, prompt, 2)  # warm-up
    times: dict[str, list[float]] = {"merged": [], "unmerged": []}
    for _ in tqdm(range(args.repeats), desc="generate", unit="round"):
        times["merged"].append(decode_seconds(merged, prompt, args.new_tokens))
        times["unmerged"].append(decode_seconds(unmerged, prompt, args.new_tokens))
    rate = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    result = {
        "what": "greedy generation tokens/s (prompt prefill included), Qwen2 with LoRA merged vs unmerged",
        "preset": args.preset,
        "shapes": PRESETS[args.preset],
        "device": args.device,
        "dtype": str(dtype),
        "threads": threads,
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "targets": TARGETS},
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_average_at_end": os.getloadavg()[0],
        "merged_tokens_per_s": rate["merged"],
        "unmerged_tokens_per_s": rate["unmerged"],
        "merged_over_unmerged": rate["merged"] / rate["unmerged"],
        "seconds": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("merged_tokens_per_s", "unmerged_tokens_per_s", "merged_over_unmerged")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
