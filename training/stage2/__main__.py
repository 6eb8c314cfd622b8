"""CLI: cohort manifest + config -> aligned encoder checkpoint, evaluation report, biomarker heads.

    python -m training.stage2 --manifest cohort/manifest.csv --out runs/stage2            # small preset, OCT+CFP
    python -m training.stage2 --manifest m.csv --out runs/s2 --preset paper --modality OCT \\
        --init-checkpoint RETFound_oct.pth --device cuda
    python -m training.stage2 --manifest m.csv --out runs/s2 --config my-stage2.json

Each modality trains in `<out>/<modality>/` (resumable: run the same command again after an interruption).
Data-parallel on several processes: `torchrun --nproc-per-node 8 -m training.stage2 ...` (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from training import distributed
from training.manifest import ManifestError
from training.stage2.config import MODALITIES, Stage2Config
from training.stage2.train import Stage2Result, run

PRESETS = {"small": Stage2Config.small, "paper": Stage2Config.paper}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.stage2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", required=True, type=Path, help="cohort manifest CSV (training/manifest.py)")
    parser.add_argument("--out", required=True, type=Path, help="output folder; one sub-folder per modality")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small",
        help="small: tiny ViT on CPU in minutes (default); paper: ViT-L recipe of the paper (GPU)",
    )
    parser.add_argument(
        "--config", type=Path, help="a Stage2Config JSON (e.g. a run's stage2-config.json); replaces --preset"
    )
    parser.add_argument(
        "--modality",
        nargs="+",
        choices=MODALITIES,
        default=list(MODALITIES),
        help="OCT (foveal B-scan, 31 biomarkers) and/or CFP (fundus photo, 6 biomarkers)",
    )
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--init-checkpoint", type=Path, help="encoder start weights: RETFound/RetiZero .pth or our encoder .safetensors"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="preprocessed-image cache folder (default <out>/<modality>/cache; share it with stage 3)",
    )
    parser.add_argument("--no-resume", action="store_true", help="start again even if <out> has a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_for(args: argparse.Namespace, modality: str) -> Stage2Config:
    out_dir = str(args.out / modality.lower())
    if args.config:
        cfg = replace(Stage2Config.load(args.config), manifest=str(args.manifest), out_dir=out_dir, modality=modality)
    else:
        cfg = PRESETS[args.preset](manifest=str(args.manifest), out_dir=out_dir, modality=modality)
    changes = {
        "epochs": args.epochs,
        "seed": args.seed,
        "device": args.device,
        "init_checkpoint": str(args.init_checkpoint) if args.init_checkpoint else None,
        "cache_dir": str(args.cache_dir) if args.cache_dir else None,
    }
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if args.no_resume:
        cfg = replace(cfg, resume=False)
    if args.no_progress:
        cfg = replace(cfg, progress=False)
    cfg.check()
    return cfg


def summary(result: Stage2Result) -> str:
    enc = result.report["encoders"]
    a, p = enc["aligned"]["overall"], enc["plain"]["overall"]
    return (
        f"{result.modality}: test MAE aligned {a['mae']:.3f} vs plain {p['mae']:.3f} "
        f"(standardised {a['mae_std']:.3f} vs {p['mae_std']:.3f}) on {result.report['n_test_subjects']} "
        f"held-out subjects\n  encoder {result.encoder_path}\n  head    {result.heads_path}\n"
        f"  report  {result.report_path} (+ .md)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed.setup()  # a no-op unless started by torchrun
    level = logging.INFO if distributed.is_main() else logging.WARNING  # one rank speaks
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run_all(args)
    finally:
        distributed.teardown()


def _run_all(args: argparse.Namespace) -> int:
    results = {}
    for modality in args.modality:
        try:
            result = run(config_for(args, modality))
        except (ManifestError, ValueError, FileNotFoundError) as exc:
            print(f"stage 2 ({modality}) failed: {exc}", file=sys.stderr)
            return 2
        if result is not None:  # None on the ranks other than 0
            results[modality] = str(result.report_path)
            print(summary(result))
    distributed.barrier()  # rank 0 evaluates while the others wait
    if distributed.is_main():
        print(json.dumps({"reports": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
