"""Encoder throughput: onnxruntime vs torch eager, full-size ViT-L/16 (224, 1024-d), batch 1 and 8.

Both GROK encoders (RetiZero with its LoRA merged, RETFound) are the same ViT-L/16 graph, so one is
measured. Weights are random (speed does not depend on them). Runs are interleaved (torch, ORT, torch, ...)
so that load from other processes hits both alike; medians are reported. Writes bench/results/encoders.json
with images/s and the ratios ort_over_torch_b1 / ort_over_torch_b8 (target: >= 1.5).

  python bench/encoders.py                 # CPU, all cores
  python bench/encoders.py --device cuda   # GPU path (CUDA provider, fp16 graph); not run on CPU-only machines
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx_export import export_encoder  # noqa: E402
from export.parity import check_encoder_parity  # noqa: E402
from grok_pacs.model.config import GrokConfig  # noqa: E402
from grok_pacs.model.vit import build_encoder  # noqa: E402
from grok_pacs.onnx_session import create_session, run_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    cfg = GrokConfig.full().oct_encoder
    encoder = build_encoder(cfg)
    cache = ROOT / ".cache" / "bench"
    onnx_path = cache / f"vit_l16_{'fp16' if args.fp16 else 'fp32'}.onnx"
    if not onnx_path.exists():
        print(f"exporting ViT-L/16 to {onnx_path} ...", flush=True)
        export_encoder(encoder, onnx_path, fp16=args.fp16)
    device = args.device
    session = create_session(onnx_path, device, threads if device == "cpu" else 0)
    parity = check_encoder_parity(encoder, onnx_path, dtype="float16" if args.fp16 else "float32",
                                  batch_sizes=(1,), device=device, raise_on_fail=False)
    model = encoder.to(device).eval()
    results = {}
    for batch in args.batches:
        pixels = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        tensor = torch.from_numpy(pixels).to(device)

        def torch_run() -> None:
            with torch.inference_mode():
                model(tensor)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def ort_run() -> None:
            run_encoder(session, pixels)

        torch_run(), ort_run()  # warm-up (allocations, kernel selection)
        torch_times, ort_times = [], []
        for _ in tqdm(range(args.repeats), desc=f"batch {batch}", unit="round"):
            torch_times += _time(torch_run, 1)
            ort_times += _time(ort_run, 1)
        t, o = statistics.median(torch_times), statistics.median(ort_times)
        results[batch] = {"torch_images_per_s": batch / t, "ort_images_per_s": batch / o,
                          "torch_s_median": t, "ort_s_median": o, "torch_s_all": torch_times, "ort_s_all": ort_times}
    return {
        "what": "ViT-L/16 encoder (224 px, 196 tokens, 1024-d): onnxruntime vs torch eager, images/s",
        "device": device, "threads": threads, "cpu": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg()[0], "onnx_dtype": "float16" if args.fp16 else "float32",
        "repeats": args.repeats, "parity": parity.to_dict(),
        "batches": {str(b): r for b, r in results.items()},
        **{f"ort_over_torch_b{b}": r["ort_images_per_s"] / r["torch_images_per_s"] for b, r in results.items()},
        "target": "ort_over_torch >= 1.5",
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (default: all cores)")
    parser.add_argument("--fp16", action="store_true", help="float16 ONNX graph (GPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encoders.json")
    args = parser.parse_args()
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ort_over")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
