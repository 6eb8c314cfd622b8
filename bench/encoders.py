"""Encoder throughput: onnxruntime vs torch eager, full-size ViT-L/16 (224, 1024-d), batch 1 and 8.

Both GROK encoders (RetiZero with its LoRA merged, RETFound) are the same ViT-L/16 graph, so one is
measured. Weights are random (speed does not depend on them). Runs are interleaved (torch, then each ONNX
precision, round after round) so that load from other processes hits all alike; medians are reported.
Writes bench/results/encoders.json: images/s per variant, ort_over_torch_b1 / ort_over_torch_b8 for the
default float32 graph and ort_<precision>_over_torch_b* for the others (target: >= 1.5), with parity.

  python -m bench.encoders                                  # CPU: float32 and int8 graphs
  python -m bench.encoders --device cuda --precisions float16  # GPU path; not run on CPU-only machines
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.onnx_export import export_encoder, quantize_int8
from export.parity import measure_encoder_parity
from grok_pacs.analysis.onnx_session import create_session, run_encoder
from grok_pacs.model.config import GrokConfig
from grok_pacs.model.vit import build_encoder

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"  # ignored by git: the ViT-L graphs are 0.3-1.2 GB


def onnx_graph(encoder: torch.nn.Module, precision: str) -> Path:
    """The cached ViT-L/16 graph in `precision` (int8 is quantised from the cached float32 graph)."""
    path = CACHE / f"vit_l16_{precision}.onnx"
    if not path.exists():
        print(f"exporting ViT-L/16 ({precision}) to {path} ...", flush=True)
        if precision == "int8":
            quantize_int8(onnx_graph(encoder, "float32"), path)
        else:
            export_encoder(encoder, path, precision=precision)
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_batch(model, sessions: dict, batch: int, repeats: int, device: str) -> dict:
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    tensor = torch.from_numpy(pixels).to(device)

    def torch_run() -> None:
        with torch.inference_mode():
            model(tensor)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    runs = {"torch": torch_run, **{p: (lambda s=s: run_encoder(s, pixels)) for p, s in sessions.items()}}
    for fn in runs.values():
        fn()  # warm-up: allocations, kernel selection
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in tqdm(range(repeats), desc=f"batch {batch}", unit="round"):
        for name, fn in runs.items():
            seconds[name].append(timed(fn))
    return {
        name: {"images_per_s": batch / statistics.median(s), "s_median": statistics.median(s), "s_all": s}
        for name, s in seconds.items()
    }


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    encoder = build_encoder(GrokConfig.full().oct_encoder)
    paths = {p: onnx_graph(encoder, p) for p in args.precisions}
    sessions = {
        p: create_session(path, args.device, threads if args.device == "cpu" else 0) for p, path in paths.items()
    }
    parity = {
        p: measure_encoder_parity(encoder, path, dtype=p, batch_sizes=(1,), device=args.device).to_dict()
        for p, path in paths.items()
    }
    model = encoder.to(args.device).eval()
    batches = {b: run_batch(model, sessions, b, args.repeats, args.device) for b in args.batches}
    ratios = {}
    for b, r in batches.items():
        for p in args.precisions:
            key = "ort_over_torch" if p == "float32" else f"ort_{p}_over_torch"
            ratios[f"{key}_b{b}"] = r[p]["images_per_s"] / r["torch"]["images_per_s"]
    return {
        "what": "ViT-L/16 encoder (224 px, 196 tokens, 1024-d): onnxruntime vs torch eager (float32), images/s",
        "device": args.device,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg()[0],
        "repeats": args.repeats,
        **ratios,
        "target": "ort_over_torch >= 1.5",
        "parity": parity,
        "batches": {str(b): r for b, r in batches.items()},
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32", "int8"],
        choices=["float32", "float16", "int8"],
        help="ONNX graphs to time (default float32 int8)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (default: all cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encoders.json")
    args = parser.parse_args()
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if "_over_torch" in k}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
