"""`python -m export`: export encoders to ONNX with a parity check, build and verify model bundles."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DESCRIPTION = """\
Model export for grok-pacs (local files only; nothing is downloaded).

  encoder   export one encoder checkpoint (RETFound .pth, RetiZero .pth or our safetensors) to ONNX and
            check it against torch (max abs difference, cosine similarity; fails beyond tolerance)
  bundle    build a verified model bundle from trained parts (encoders, heads, projectors, LLM, tokenizer)
  verify    check every file of a bundle against its manifest (sha256) and print its identity
"""


PRECISIONS = ("float32", "float16", "int8")
PRECISION_HELP = (
    "encoder ONNX precision: float32 (default), float16 (GPU serving) or int8 (CPU serving: int8 "
    "weight MatMuls, several times faster on CPU, looser parity tolerance)"
)


def _config(value: str):
    from grok_pacs.model.config import GrokConfig

    if value in ("full", "tiny"):
        return GrokConfig.full() if value == "full" else GrokConfig.tiny()
    return GrokConfig.from_dict(json.loads(Path(value).read_text()))


def _cmd_encoder(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from export.onnx_export import export_encoder
    from export.parity import measure_encoder_parity
    from grok_pacs.model.checkpoints import load_encoder

    config = _config(args.config)
    cfg = config.cfp_encoder if args.kind == "cfp" else config.oct_encoder
    with tqdm(total=3, desc=f"{args.kind} encoder", unit="step") as bar:
        encoder = load_encoder(args.checkpoint, cfg)
        bar.set_postfix_str("loaded")
        bar.update()
        export_encoder(encoder, args.out, precision=args.precision)
        bar.set_postfix_str("exported")
        bar.update()
        result = measure_encoder_parity(encoder, args.out, dtype=args.precision, name=args.kind)
        bar.set_postfix_str("parity checked")
        bar.update()
    print(result)
    return 0 if result.passed else 1


def _cmd_bundle(args: argparse.Namespace) -> int:
    from export.build_bundle import BundleOptions, ModelParts, build_bundle
    from grok_pacs.model.heads import BiomarkerHead

    provenance = json.loads(Path(args.provenance).read_text()) if args.provenance else {}
    parts = ModelParts(
        config=_config(args.config),
        cfp_encoder=args.cfp_encoder,
        oct_encoder=args.oct_encoder,
        heads=[BiomarkerHead.load(args.oct_head), BiomarkerHead.load(args.cfp_head)],
        projectors=args.projectors,
        tokenizer_dir=args.tokenizer_dir,
        llm_dir=args.llm_dir,
        base_dir=args.base_dir,
        adapter_dir=args.adapter_dir,
        merge=not args.no_merge,
    )
    options = BundleOptions(precision=args.precision, overwrite=args.overwrite)
    path = build_bundle(args.out, parts, name=args.name, version=args.version, provenance=provenance, options=options)
    print(f"bundle written: {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from grok_pacs.analysis.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"REFUSED: {exc}", file=sys.stderr)
        return 1
    files = bundle.manifest["files"]
    size = sum(entry["bytes"] for entry in files.values())
    print(
        f"ok: {bundle.name} {bundle.version} ({bundle.layout}), {len(files)} files, {size / 1e6:.1f} MB, "
        f"created {bundle.manifest['created']}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encoder", help="export one encoder to ONNX and check parity with torch")
    enc.add_argument("--kind", choices=("cfp", "oct"), required=True, help="which tower (shape from --config)")
    enc.add_argument("--checkpoint", type=Path, required=True, help="RETFound/RetiZero .pth or encoder .safetensors")
    enc.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    enc.add_argument("--config", default="full", help="'full', 'tiny' or a GrokConfig JSON file (default full)")
    enc.add_argument("--precision", choices=PRECISIONS, default="float32", help=PRECISION_HELP)
    enc.set_defaults(func=_cmd_encoder)
    bun = sub.add_parser("bundle", help="build a verified model bundle")
    bun.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    for name, text in (
        ("cfp-encoder", "CFP encoder (.safetensors or RetiZero .pth)"),
        ("oct-encoder", "OCT encoder (.safetensors or RETFound .pth)"),
        ("oct-head", "OCT biomarker head .safetensors"),
        ("cfp-head", "CFP biomarker head .safetensors"),
        ("projectors", "projectors .safetensors"),
        ("tokenizer-dir", "tokenizer directory"),
    ):
        bun.add_argument(f"--{name}", type=Path, required=True, help=text)
    bun.add_argument("--llm-dir", type=Path, help="Qwen2 directory with the LoRA already merged")
    bun.add_argument("--base-dir", type=Path, help="base Qwen2 directory (with --adapter-dir)")
    bun.add_argument("--adapter-dir", type=Path, help="PEFT LoRA adapter directory (with --base-dir)")
    bun.add_argument("--no-merge", action="store_true", help="store base + adapter, merged at load time")
    bun.add_argument("--name", required=True, help="bundle name, e.g. grok-7b")
    bun.add_argument("--version", required=True, help="bundle version, e.g. 1.0.0")
    bun.add_argument("--provenance", type=Path, help="JSON file: training data, configs, commits")
    bun.add_argument("--config", default="full", help="'full', 'tiny' or a GrokConfig JSON file (default full)")
    bun.add_argument("--precision", choices=PRECISIONS, default="float32", help=PRECISION_HELP)
    bun.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    bun.set_defaults(func=_cmd_bundle)
    ver = sub.add_parser("verify", help="verify a bundle's files against its manifest")
    ver.add_argument("bundle", type=Path, help="bundle directory")
    ver.set_defaults(func=_cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
