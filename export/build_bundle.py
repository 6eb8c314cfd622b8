"""Build a verified model bundle (layout: grok_pacs.analysis.bundle) from trained parts.

The stage-3 engineer calls `build_bundle(...)`; `python -m export bundle` is the same from the command line.
The bundle is written under `<out_dir>.partial` and renamed into place only after it verified, so an
interrupted build never looks like a bundle.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from export.onnx_export import INPUT_NAME, OUTPUT_NAMES, export_encoder
from export.parity import check_encoder_parity
from grok_pacs.analysis import bundle as layout
from grok_pacs.domain.biomarkers import BIOMARKERS, Modality
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from grok_pacs.model.checkpoints import load_encoder
from grok_pacs.model.config import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, GrokConfig
from grok_pacs.model.decision import DECISION_FILE, DecisionClassifier
from grok_pacs.model.heads import BiomarkerHead
from grok_pacs.model.pattern import PATTERN_HEAD_FILE, PatternHead
from grok_pacs.model.projector import Projectors
from grok_pacs.model.prompt import IMAGE_TOKEN, SPECIAL_TOKENS, prompt_template
from grok_pacs.model.vit import RetinaEncoder

#: Weight formats that are pickle: never copied into a bundle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _encoder(value: RetinaEncoder | str | Path, cfg: EncoderConfig, name: str) -> RetinaEncoder:
    encoder = value if isinstance(value, RetinaEncoder) else load_encoder(value, cfg)
    if encoder.embed_dim != cfg.embed_dim or encoder.patch_embed.num_patches != cfg.num_patches:
        raise ValueError(
            f"{name}: encoder is {encoder.embed_dim}-d with {encoder.patch_embed.num_patches} patches, "
            f"config says {cfg.embed_dim}-d with {cfg.num_patches}"
        )
    return encoder.eval()


def _heads(heads: Mapping[Any, BiomarkerHead] | Iterable[BiomarkerHead]) -> dict[Modality, BiomarkerHead]:
    items = heads.values() if isinstance(heads, Mapping) else heads
    out = {Modality(h.modality): h for h in items}
    if set(out) != {Modality.OCT, Modality.CFP}:
        raise ValueError(f"heads: need one OCT and one CFP head, got {sorted(out)}")
    return out


def copy_weights_dir(src: str | Path, dst: Path, what: str) -> None:
    """Copy a transformers/PEFT directory, refusing pickle weights (safetensors only)."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{what} {src} is not a directory")
    files = [p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")]
    pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ValueError(f"{what} {src} holds pickle weights ({', '.join(pickled[:3])}); save with safetensors")
    if not any(p.suffix == ".safetensors" for p in files) and what != "tokenizer_dir":
        raise ValueError(f"{what} {src} holds no .safetensors weights")
    for path in files:
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: Path) -> None:
    """base + PEFT LoRA adapter -> one merged model directory (merge_and_unload), safetensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir), local_files_only=True).merge_and_unload()
    merged.save_pretrained(str(out_dir))


def _check_tokenizer(tokenizer_dir: Path, llm_config: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"tokenizer {tokenizer_dir}: {token} is not one special token ({ids})")
    vocab = json.loads(llm_config.read_text()).get("vocab_size", 0)
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the LLM embeds only {vocab} (resize embeddings)")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) is None:
        raise ValueError(f"tokenizer {tokenizer_dir} lacks {IMAGE_TOKEN}")


def _encoder_entry(rel: str, cfg: EncoderConfig, precision: str, parity: Any) -> dict[str, Any]:
    return {
        "file": rel,
        "precision": precision,
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "image_size": cfg.img_size,
        "tokens": cfg.num_patches,
        "dim": cfg.embed_dim,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "parity": parity.to_dict() if parity is not None else None,
    }


def _manifest(name: str, version: str, config: GrokConfig, llm: dict, encoders: dict, provenance: dict) -> dict:
    import onnx
    import torch
    import transformers

    return {
        "format": layout.BUNDLE_FORMAT,
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": [label.value for label in DIAGNOSTIC_LABELS],
        "biomarkers": [
            {
                "key": b.key,
                "name": b.name,
                "modality": b.modality.value,
                "unit": b.unit,
                "normal": list(b.normal),
                "plausible": list(b.plausible),
            }
            for b in BIOMARKERS
        ],
        "prompt": prompt_template(),
        "config": config.to_dict(),
        "llm": llm,
        "encoders": encoders,
        "heads": {"oct": layout.OCT_HEAD, "cfp": layout.CFP_HEAD},
        "projectors": layout.PROJECTORS,
        "tokenizer": layout.TOKENIZER_DIR,
        "provenance": {
            **provenance,
            "built_with": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "transformers": transformers.__version__,
            },
        },
    }


def _export_encoders(
    work: Path, config: GrokConfig, cfp_encoder: Any, oct_encoder: Any, precision: str, parity: bool, step: Any
) -> dict[str, Any]:
    """Both encoders to ONNX, each checked against torch (ParityError beyond tolerance)."""
    encoders = {}
    for key, rel, value, cfg in (
        ("cfp", layout.CFP_ENCODER, cfp_encoder, config.cfp_encoder),
        ("oct", layout.OCT_ENCODER, oct_encoder, config.oct_encoder),
    ):
        encoder = _encoder(value, cfg, f"{key}_encoder")
        export_encoder(encoder, work / rel, precision=precision)
        result = check_encoder_parity(encoder, work / rel, dtype=precision, name=f"{key}_encoder") if parity else None
        encoders[key] = _encoder_entry(rel, cfg, precision, result)
        step(f"{key} encoder exported")
    return encoders


def _write_heads(work: Path, config: GrokConfig, heads: Any) -> None:
    head_map = _heads(heads)
    for modality, rel, cfg in (
        (Modality.OCT, layout.OCT_HEAD, config.oct_encoder),
        (Modality.CFP, layout.CFP_HEAD, config.cfp_encoder),
    ):
        head = head_map[modality]
        expected = head.input_dim(cfg.embed_dim)
        if head.feature_dim != expected or head.grid**2 > cfg.num_patches:
            raise ValueError(
                f"{modality} head reads {head.feature_dim}-d features with a {head.grid}x{head.grid} grid; the "
                f"encoder ({cfg.embed_dim}-d tokens, {cfg.num_patches} patches) gives {expected}"
            )
        head.save(work / rel)


def _write_llm(work: Path, llm_dir: Any, base_dir: Any, adapter_dir: Any, merge: bool) -> dict[str, Any]:
    """The language model as served: merged (copied, or merged here) or base + adapter side by side."""
    if llm_dir is not None:
        copy_weights_dir(llm_dir, work / layout.LLM_DIR, "llm_dir")
        return {"layout": "merged", "dir": layout.LLM_DIR}
    if merge:
        merge_adapter(base_dir, adapter_dir, work / layout.LLM_DIR)
        return {
            "layout": "merged",
            "dir": layout.LLM_DIR,
            "merged_from": {"base": str(base_dir), "adapter": str(adapter_dir)},
        }
    copy_weights_dir(base_dir, work / layout.LLM_BASE_DIR, "base_dir")
    copy_weights_dir(adapter_dir, work / layout.LLM_ADAPTER_DIR, "adapter_dir")
    return {"layout": "adapter", "base_dir": layout.LLM_BASE_DIR, "adapter_dir": layout.LLM_ADAPTER_DIR}


@dataclass(frozen=True)
class ModelParts:
    """The trained parts a bundle is built from, as objects or as the paths they were saved to.

    LLM: `llm_dir` (LoRA already merged), or `base_dir` + `adapter_dir` (merged here when `merge`, else stored
    side by side and merged at load). `pattern_head`: the pattern head stage 3 trained the prompt with
    (grok_pacs.model.pattern), stored as pattern_head.json. `decision`: the decision classifier that decides
    each eye's label (grok_pacs.model.decision), stored as decision.json; without it the LM decides.
    """

    config: GrokConfig
    cfp_encoder: RetinaEncoder | str | Path
    oct_encoder: RetinaEncoder | str | Path
    heads: Mapping[Any, BiomarkerHead] | Iterable[BiomarkerHead]
    projectors: Projectors | str | Path
    tokenizer_dir: str | Path
    llm_dir: str | Path | None = None
    base_dir: str | Path | None = None
    adapter_dir: str | Path | None = None
    merge: bool = True
    pattern_head: PatternHead | str | Path | None = None
    decision: DecisionClassifier | str | Path | None = None


@dataclass(frozen=True)
class BundleOptions:
    """How to build: encoder `precision` "float32", "float16" (GPU serving) or "int8" (CPU serving; see
    export.onnx_export); `parity` checks each ONNX encoder against torch; `overwrite` replaces `out_dir`."""

    precision: str = "float32"
    parity: bool = True
    overwrite: bool = False
    progress: bool = True


def build_bundle(
    out_dir: str | Path,
    parts: ModelParts,
    *,
    name: str,
    version: str,
    provenance: dict,
    options: BundleOptions | None = None,
) -> Path:
    """Export, copy, hash and verify `parts` into a bundle directory; returns its path.

    Raises ValueError naming the bad input, ParityError when an encoder export drifts from torch beyond the
    precision's tolerance.
    """
    options = options or BundleOptions()
    config = parts.config
    llm_dir, base_dir, adapter_dir = parts.llm_dir, parts.base_dir, parts.adapter_dir
    config.check()
    if (llm_dir is None) == (base_dir is None or adapter_dir is None):
        raise ValueError("give either llm_dir, or base_dir and adapter_dir")
    json.dumps(provenance, default=_json_default)  # must be JSON (TypeError names the bad value)
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise FileExistsError(f"{out} exists (pass BundleOptions(overwrite=True) to replace it)")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    steps = tqdm(total=8, desc=f"bundle {name} {version}", unit="step", disable=not options.progress)

    def step(label: str) -> None:
        steps.set_postfix_str(label)
        steps.update(1)

    encoders = _export_encoders(
        work, config, parts.cfp_encoder, parts.oct_encoder, options.precision, options.parity, step
    )
    _write_heads(work, config, parts.heads)
    step("heads")
    projectors = parts.projectors
    proj = projectors if isinstance(projectors, Projectors) else Projectors.load(projectors, config.projector)
    proj.save(work / layout.PROJECTORS)
    step("projectors")
    llm = _write_llm(work, llm_dir, base_dir, adapter_dir, parts.merge)
    step("language model")
    copy_weights_dir(parts.tokenizer_dir, work / layout.TOKENIZER_DIR, "tokenizer_dir")
    _check_tokenizer(work / layout.TOKENIZER_DIR, work / (llm.get("dir") or llm["base_dir"]) / "config.json")
    step("tokenizer")
    manifest = _manifest(name, version, config, llm, encoders, provenance)
    if (pattern_head := parts.pattern_head) is not None:
        head = pattern_head if isinstance(pattern_head, PatternHead) else PatternHead.load(pattern_head)
        head.save(work / PATTERN_HEAD_FILE)
        manifest["pattern_head"] = {"file": PATTERN_HEAD_FILE}
    if (decision := parts.decision) is not None:
        classifier = decision if isinstance(decision, DecisionClassifier) else DecisionClassifier.load(decision)
        classifier.save(work / DECISION_FILE)
        manifest["decision"] = {"file": DECISION_FILE}
    # Which component decides each eye's label (the SR and PDF say it per report)
    manifest["decides"] = "decision classifier" if parts.decision is not None else "language model"
    manifest["files"] = layout.file_table(work)
    (work / layout.MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    step("manifest")
    layout.load_bundle(work)  # the same verification the runtime does
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    step("verified")
    steps.close()
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
