"""Benchmark: the image-quality gate on degraded phantom eyes (issue 15).

Renders phantom eyes (training.phantom, fixed seed, labels in turn), scores each CFP and OCT clean and once
degraded (training.benchmark.safety.DEGRADATIONS) with the runtime's gate at its default thresholds, and
writes bench/results/gate.json: per modality AUROC and sensitivity at 95% specificity of the ungradability
score, the gate's own sensitivity/specificity at its thresholds, detection per degradation, and the number
of fully degraded eyes the gate would still let through to a diagnosis.
Usage: python -m bench.gate [--eyes 84] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.benchmark.safety import gate_benchmark, phantom_eyes

RESULTS = Path(__file__).resolve().parent / "results" / "gate.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eyes", type=int, default=84)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    result = gate_benchmark(phantom_eyes(args.eyes, args.seed), seed=args.seed)
    result.update(
        seed=args.seed,
        wall_s=round(time.perf_counter() - start, 1),
        data="synthetic phantom renders (training.phantom); no real photographs",
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
