"""`python -m training.pipeline`: the phantom demo by default, any cohort manifest with `--manifest`.

Without `--manifest` and the paper options the configuration is exactly the demo's (`make demo`, same
cache keys). `--plan` prints what a run would do (the cohort, each step's cache key and whether it is
cached, the code's commit) and builds nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.manifest import ManifestError
from training.pipeline import (
    DECIDERS,
    DEFAULT_CACHE,
    DONE,
    PRESETS,
    PipelineConfig,
    quiet_exporter_logs,
    run_pipeline,
    step_digests,
)
from training.stage3.config import Stage3Config

BUILT_IN_LLMS = ("smollm2", "tiny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The pipeline end to end: a cohort (the synthetic phantom, with DICOM studies, or --manifest), "
        "stage 1 (guideline-teacher instructions), stage 2 (OCT and CFP encoders aligned with their "
        "biomarkers, biomarker heads), stage 3 (LoRA SFT with trainable projectors on SmolLM2-135M-Instruct "
        "converted once into a Qwen2 directory as the stand-in for Qwen2-7B-Instruct, or on --llm DIR) and a "
        "verified model bundle. Each step is cached by the hash of its settings: a second run is instant, a "
        "changed step re-runs from there. Own data: docs/training.md, Training on your own data.",
        epilog="example: python -m training.pipeline --subjects 140 --cache .cache/pipeline\n"
        "         python -m training.pipeline --manifest cohort/manifest.csv --plan\n"
        "then:    grok-pacs serve --bundle <printed bundle path> ...",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--manifest", type=Path, help="train on this cohort manifest instead of the phantom")
    parser.add_argument("--subjects", type=int, help=f"phantom subjects (default {PipelineConfig.n_subjects})")
    parser.add_argument("--seed", type=int, help=f"phantom cohort seed (default {PipelineConfig.seed})")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="cpu",
        help="cpu: tiny encoders and SmolLM2-sized stage 3 (the demo's); paper: ViT-L encoders (RETFound / "
        "RetiZero init) and the paper's stage 3 on --llm DIR (GPU, bf16)",
    )
    parser.add_argument("--oct-encoder", type=Path, help="RETFound .pth the OCT encoder starts from (--preset paper)")
    parser.add_argument("--cfp-encoder", type=Path, help="RetiZero .pth the CFP encoder starts from (--preset paper)")
    parser.add_argument(
        "--llm",
        default="smollm2",
        help="stage 3's LLM base: smollm2 = SmolLM2-135M-Instruct converted to Qwen2 (the stand-in "
        "for Qwen2-7B-Instruct), tiny = a 0.5M-parameter Qwen2 trained from scratch, or the directory of a "
        "local Qwen2(-Instruct) model (needed by --preset paper)",
    )
    parser.add_argument(
        "--no-estimates", action="store_true", help="train stage 3 without the biomarker estimates in the prompt"
    )
    parser.add_argument(
        "--decider",
        choices=DECIDERS,
        default="classifier",
        help="who decides each eye's label: classifier = a decision classifier on cross-fitted estimates "
        "(its label ends the prompt; the LM writes the findings), lm = the language model from its own scored "
        "labels, no classifier line (the paper's configuration)",
    )
    parser.add_argument("--bundle-name", help="bundle identity (default grok-phantom, or grok with --manifest)")
    parser.add_argument("--bundle-version", default=PipelineConfig.bundle_version, help="bundle version")
    parser.add_argument("--plan", action="store_true", help="print the cohort and each step's cache key; train nothing")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the result paths to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.manifest is not None and not args.manifest.is_file():
        parser.error(f"--manifest: no file {args.manifest}")
    if args.manifest is not None and (args.subjects is not None or args.seed is not None):
        parser.error("--subjects and --seed shape the phantom cohort: not with --manifest")
    if (args.oct_encoder or args.cfp_encoder) and args.preset != "paper":
        parser.error("--oct-encoder / --cfp-encoder are ViT-L weights (RETFound, RetiZero): use --preset paper")
    for option in ("oct_encoder", "cfp_encoder"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"--{option.replace('_', '-')}: no file {path}")
    if args.llm not in BUILT_IN_LLMS and not Path(args.llm).is_dir():
        parser.error(f"--llm: expected {' or '.join(BUILT_IN_LLMS)} or a model directory, got {args.llm!r}")
    if args.preset == "paper" and args.llm in BUILT_IN_LLMS:
        parser.error("--preset paper trains a real Qwen2 (7B in the paper): give its directory with --llm DIR")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The run's configuration; with no option given, exactly the demo's."""
    estimates = not args.no_estimates
    if args.llm == "smollm2":
        llm, stage3 = "smollm2", Stage3Config.smollm(biomarker_estimates=estimates)
    elif args.llm == "tiny":
        llm, stage3 = "tiny", Stage3Config.small(biomarker_estimates=estimates)
    else:  # a local model: the paper's recipe on it, or on the CPU the preset made for a pretrained small LLM
        preset = Stage3Config.paper if args.preset == "paper" else Stage3Config.smollm
        llm, stage3 = "local", preset(base_llm_dir=Path(args.llm).resolve(), biomarker_estimates=estimates)
    changes: dict[str, Any] = {"llm": llm, "stage3": stage3, "preset": args.preset, "decider": args.decider}
    changes["oct_encoder"] = str(args.oct_encoder.resolve()) if args.oct_encoder else ""
    changes["cfp_encoder"] = str(args.cfp_encoder.resolve()) if args.cfp_encoder else ""
    if args.manifest is not None:
        changes.update(manifest=str(args.manifest.resolve()), bundle_name="grok", calibration_subjects=0)
    else:
        changes.update(n_subjects=PipelineConfig.n_subjects if args.subjects is None else args.subjects)
        changes.update(seed=PipelineConfig.seed if args.seed is None else args.seed)
    if args.bundle_name:
        changes["bundle_name"] = args.bundle_name
    return PipelineConfig.small(bundle_version=args.bundle_version, **changes)


def plan(cfg: PipelineConfig, cache_dir: Path) -> dict[str, Any]:
    """What a run would use and reuse: the cohort, each step's key and folder, the code's commit."""
    from training.cohort.fingerprint import code_commit, cohort_fingerprint

    cache_dir = Path(cache_dir).resolve()
    keys = step_digests(cfg)
    steps = {}
    for name, key in keys.items():
        folder = cache_dir / f"{name}-{key}"
        steps[name] = {"key": key, "folder": str(folder), "cached": (folder / DONE).is_file()}
    manifest = Path(cfg.manifest) if cfg.manifest else None
    if manifest is None and steps["cohort"]["cached"]:  # the phantom's manifest exists once generated
        manifest = Path(json.loads((Path(steps["cohort"]["folder"]) / DONE).read_text())["manifest"])
    cohort = {
        "source": "manifest" if cfg.manifest else "phantom",
        "manifest": str(manifest) if manifest else None,
        "fingerprint": cohort_fingerprint(manifest) if manifest else None,
    }
    run = {"preset": cfg.preset, "llm": cfg.llm, "bundle": f"{cfg.bundle_name} {cfg.bundle_version}"}
    return {"cohort": cohort, "steps": steps, "run": run, "code": code_commit()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_exporter_logs()
    cfg = config_from_args(args)
    try:
        result = (
            plan(cfg, args.cache) if args.plan else run_pipeline(cfg, args.cache, progress=not args.quiet).to_dict()
        )
    except ManifestError as exc:  # every problem of the given manifest, with its row
        logging.getLogger("training.pipeline").error("%s", exc)
        return 2
    text = json.dumps(result, indent=1)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
