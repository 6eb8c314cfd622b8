"""`python -m training.stage3`: LoRA SFT of the multimodal Qwen2 (docs/domain.md, The GROK model, stage 3) from the
command line."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from training.stage3.config import PRESETS, SHARDS, Stage3Config

EPILOG = """\
examples:
  # phantom / CPU: tiny stand-in Qwen2 pretrained here first, phantom BPE tokenizer
  python -m training.stage3 --instructions work/stage1/instructions.jsonl --manifest work/cohort/manifest.csv \\
      --cfp-encoder work/stage2-cfp/encoder.safetensors --oct-encoder work/stage2-oct/encoder.safetensors \\
      --cfp-head work/stage2-cfp/CFP-head.safetensors --oct-head work/stage2-oct/OCT-head.safetensors \\
      --out work/stage3
  # the paper's recipe on real weights (GPU, bf16): the stand-in pretraining is skipped
  python -m training.stage3 --preset paper --base-llm /models/Qwen2-7B-Instruct ... --out runs/stage3
  # the same on 8 GPUs of one node, the model sharded over them
  torchrun --standalone --nproc-per-node 8 -m training.stage3 --preset paper --shard fsdp ... --out runs/stage3

The run folder receives checkpoints/ (resumed automatically), loss_curve.png, adapter/, projectors.safetensors,
llm_merged/ (LoRA merged), tokenizer/ and stage3.json. Pack a bundle with export.build_bundle (or use
`python -m training.pipeline`, which does every stage and the bundle).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.stage3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Stage 3: supervised fine-tuning of the multimodal Qwen2 with frozen encoders, trainable "
        "projectors and LoRA adapters on q/k/v/o/gate/up/down_proj; loss on assistant tokens only.",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small",
        help="small: CPU, phantom, tiny stand-in LLM (default); smollm: CPU, phantom, --base-llm = the "
        "converted SmolLM2 (training.pipeline does it); paper: r=128, alpha=256, lr 2e-4, bf16",
    )
    parser.add_argument("--instructions", type=Path, required=True, help="stage-1 instruction JSONL")
    parser.add_argument("--manifest", type=Path, required=True, help="cohort manifest CSV (images and splits)")
    parser.add_argument("--cfp-encoder", type=Path, required=True, help="CFP encoder (.safetensors or RetiZero .pth)")
    parser.add_argument("--oct-encoder", type=Path, required=True, help="stage-2 aligned OCT encoder (.safetensors)")
    parser.add_argument("--cfp-head", type=Path, required=True, help="CFP biomarker head (.safetensors)")
    parser.add_argument("--oct-head", type=Path, required=True, help="OCT biomarker head (.safetensors)")
    parser.add_argument("--image-cache", type=Path, default=None, help="preprocessed-image cache shared with stage 2")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument(
        "--base-llm",
        type=Path,
        default=None,
        help="local Qwen2(-Instruct) directory; without it the stand-in tiny Qwen2 is pretrained",
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the base LLM's)")
    parser.add_argument(
        "--biomarker-estimates",
        action="store_true",
        help="put the biomarker heads' estimates in the prompt (as the runtime then must)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--lora-r", type=int, default=None, help="override the LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=None, help="override the LoRA alpha")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument(
        "--shard",
        choices=SHARDS,
        default=None,
        help="under torchrun (one GPU per process): ddp (default) keeps a whole copy of the model on every GPU; "
        "fsdp shards the frozen base, the LoRA and the projectors over the ranks, so a 7B base fits where a "
        "whole copy plus activations does not. Checkpoints are the same either way",
    )
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Stage3Config:
    if args.preset == "smollm" and args.base_llm is None:
        raise SystemExit("--preset smollm needs --base-llm (the Qwen2 directory training.stage3.smollm converts)")
    cfg = PRESETS[args.preset](base_llm_dir=args.base_llm)
    changes = {
        "tokenizer_dir": args.tokenizer,
        "biomarker_estimates": args.biomarker_estimates or None,
        "epochs": args.epochs,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "gradient_checkpointing": args.gradient_checkpointing or None,
        "shard": args.shard,
    }
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training import distributed

    distributed.setup()  # a no-op unless started by torchrun
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)  # one rank speaks
    try:
        return _train(args)
    finally:
        distributed.teardown()


def _train(args: argparse.Namespace) -> int:
    from training.stage3.run import Stage3Inputs, run

    inputs = Stage3Inputs(
        args.instructions,
        args.manifest,
        args.cfp_encoder,
        args.oct_encoder,
        args.cfp_head,
        args.oct_head,
        args.image_cache,
    )
    result = run(config_from_args(args), inputs, args.out, resume=not args.no_resume, progress=not args.quiet)
    if result is None:  # a rank other than 0: rank 0 wrote the outputs
        return 0
    print(
        f"adapter: {result.adapter_dir}\nprojectors: {result.projectors_path}\nmerged LLM: {result.merged_llm_dir}\n"
        f"loss curve: {result.curve_png}\nvalidation loss: {result.report['first_val_loss']:.4f} -> "
        f"{result.report['last_val_loss']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
