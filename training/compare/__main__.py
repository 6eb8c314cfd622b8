"""`python -m training.compare CANDIDATE_BUNDLE SERVING_BUNDLE --manifest PATH [--split test] [--out DIR]`.

Prints both bundles' versions, the verdict and the rule; writes `comparison.json` and `comparison.md` (and
each bundle's benchmark report) to --out, by default `<candidate>.compare/` beside the candidate. Exits 0
whatever the verdict (it is in the output); 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from grok_pacs.analysis.bundle import BundleError
from training.compare.bootstrap import MACRO_F1_MARGIN, paired_bootstrap, rule_text, verdict
from training.compare.report import payload, write
from training.compare.scoring import held_out, run_bundle
from training.manifest import ManifestError


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.compare",
        description="Score a candidate bundle and the serving bundle on the same held-out eyes; say which to serve.",
    )
    parser.add_argument("candidate", type=Path, help="the candidate bundle directory")
    parser.add_argument("serving", type=Path, help="the serving bundle directory")
    parser.add_argument("--manifest", type=Path, required=True, help="cohort manifest.csv holding the eyes")
    parser.add_argument("--split", default="test", help="the manifest split to score (default test)")
    parser.add_argument("--instructions", type=Path, help="stage-1 instructions.jsonl: reference reports")
    parser.add_argument("--out", type=Path, help="output folder (default <candidate>.compare beside it)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="engine CPU threads (0: the runtime's default)")
    parser.add_argument(
        "--batch-eyes",
        type=int,
        default=8,
        help="eyes a generation (default 8: on a CPU about half the time of 0, a subject's eyes a generation as the "
        "runtime does; same labels, but seconds per eye are then not the runtime's)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def compare_bundles(args: argparse.Namespace) -> dict:
    refs, records = held_out(args.manifest, args.split, args.instructions)
    runs = {
        role: run_bundle(path, args.manifest, refs, records, not args.quiet, args.threads, args.batch_eyes)
        for role, path in (("serving", args.serving), ("candidate", args.candidate))
    }
    table = paired_bootstrap(runs["serving"].outcomes, runs["candidate"].outcomes, args.resamples, args.seed)
    rule = rule_text(args.resamples, args.seed)
    setup = {
        "manifest": str(args.manifest),
        "split": args.split,
        "references": f"stage-1 instructions {args.instructions}" if args.instructions else "guideline teacher",
        "resamples": args.resamples,
        "seed": args.seed,
        "level": 0.95,
        "macro_f1_margin": MACRO_F1_MARGIN,
        "batch_eyes": args.batch_eyes,
    }
    data = payload(runs["candidate"], runs["serving"], table, verdict(table), rule, setup)
    out = args.out or args.candidate.with_name(f"{args.candidate.name}.compare")
    data["files"] = {k: str(v) for k, v in write(out, data, runs["candidate"], runs["serving"]).items()}
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        data = compare_bundles(args)
    except (BundleError, ManifestError, ValueError, FileNotFoundError) as error:
        print(f"training.compare: {error}", file=sys.stderr)
        return 2
    cand, serv, macro = data["candidate"], data["serving"], data["figures"]["macro_f1"]
    print(f"candidate: {cand['name']} version {cand['version']} ({cand['path']})")
    print(f"serving:   {serv['name']} version {serv['version']} ({serv['path']})")
    low, high = macro["difference"]["interval"]
    print(
        f"macro-F1 {macro['candidate']['value']:.4f} vs {macro['serving']['value']:.4f}, "
        f"difference {macro['difference']['value']:+.4f} [{low:+.4f}, {high:+.4f}] on {data['n_eyes']} eyes"
    )
    for check in data["verdict"]["checks"]:
        print(f"  {'ok  ' if check['passed'] else 'FAIL'} {check['detail']}")
    print(f"verdict: {data['verdict']['decision']}")
    print(f"rule: {data['rule']}")
    print(f"report: {data['files']['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
