"""The model bundle: one directory that carries a trained GROK model to a hospital, verified before use.

Layout (paths relative to the bundle root; `export.build_bundle` writes it, `load_bundle` reads it):
    manifest.json                  identity, label set, biomarker schema, prompt, config, provenance,
                                   and the sha256 + size of every other file
    encoders/cfp_encoder.onnx      RetiZero (LoRA merged), pixels [B,3,224,224] -> tokens [B,196,D], pooled [B,D]
    encoders/oct_encoder.onnx      RETFound (stage-2 aligned), same interface
    heads/oct_head.safetensors     31 OCT biomarkers from the OCT pooled feature
    heads/cfp_head.safetensors     6 CFP biomarkers from the CFP pooled feature
    projectors.safetensors         CFP / OCT projectors and the missing-modality placeholders
    llm/                           Qwen2 with the LoRA merged (layout "merged"), or
    llm_base/ + llm_adapter/       base model + PEFT adapter, merged at load (layout "adapter")
    tokenizer/                     tokenizer with the ChatML tokens and <image>

Loading checks every listed file's size and sha256 and refuses a bundle with a missing, modified or
unlisted file, or a symlink, naming the file. Nothing in a bundle is pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grok_pacs.domain.labels import DIAGNOSTIC_LABELS
from grok_pacs.model.config import GrokConfig

BUNDLE_FORMAT = "grok-pacs-bundle/1"
MANIFEST = "manifest.json"
CFP_ENCODER = "encoders/cfp_encoder.onnx"
OCT_ENCODER = "encoders/oct_encoder.onnx"
OCT_HEAD = "heads/oct_head.safetensors"
CFP_HEAD = "heads/cfp_head.safetensors"
PROJECTORS = "projectors.safetensors"
LLM_DIR = "llm"
LLM_BASE_DIR = "llm_base"
LLM_ADAPTER_DIR = "llm_adapter"
TOKENIZER_DIR = "tokenizer"
LAYOUTS = ("merged", "adapter")
REQUIRED_MANIFEST_KEYS = (
    "format",
    "name",
    "version",
    "created",
    "labels",
    "biomarkers",
    "prompt",
    "config",
    "llm",
    "provenance",
    "files",
)
_CHUNK = 1 << 20


class BundleError(RuntimeError):
    """A bundle that must not be served; the message names the file or field."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every file under `root` except the manifest, as sorted POSIX relative paths (symlinks refused)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise BundleError(f"bundle {root}: {rel} is a symlink; bundles hold plain files only")
        if path.is_file() and rel != MANIFEST:
            out.append(rel)
    return out


def file_table(root: Path, progress: Any = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "bytes"}} for the manifest."""
    table = {}
    for rel in bundle_files(root):
        path = root / rel
        table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        if progress is not None:
            progress(rel)
    return table


def required_files(layout: str) -> tuple[str, ...]:
    """Files (or directories, ending in '/') a bundle of `layout` must list."""
    llm = (f"{LLM_DIR}/",) if layout == "merged" else (f"{LLM_BASE_DIR}/", f"{LLM_ADAPTER_DIR}/")
    return (CFP_ENCODER, OCT_ENCODER, OCT_HEAD, CFP_HEAD, PROJECTORS, f"{TOKENIZER_DIR}/", *llm)


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    config: GrokConfig

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def layout(self) -> str:
        return str(self.manifest["llm"]["layout"])

    def path(self, rel: str) -> Path:
        return self.root / rel


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a directory")
    if not path.is_file():
        raise BundleError(f"bundle {root}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST} is not valid JSON: {exc}") from exc
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"bundle {root}: {MANIFEST} lacks {', '.join(missing)}")
    if manifest["format"] != BUNDLE_FORMAT:
        raise BundleError(f"bundle {root}: format {manifest['format']!r}, this runtime reads {BUNDLE_FORMAT!r}")
    if manifest["labels"] != [label.value for label in DIAGNOSTIC_LABELS]:
        raise BundleError(f"bundle {root}: label set {manifest['labels']} differs from this runtime's")
    if manifest["llm"].get("layout") not in LAYOUTS:
        raise BundleError(f"bundle {root}: llm.layout must be one of {LAYOUTS}")
    return manifest


def _check_files(root: Path, listed: dict[str, dict[str, Any]], layout: str) -> None:
    for need in required_files(layout):
        if not any(rel == need or (need.endswith("/") and rel.startswith(need)) for rel in listed):
            raise BundleError(f"bundle {root} is incomplete: {need} is not in the manifest")
    present = set(bundle_files(root))
    for rel, entry in listed.items():
        path = root / rel
        if rel not in present:
            raise BundleError(f"bundle {root} is incomplete: {rel} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"bundle {root}: {rel} has been modified (size {path.stat().st_size}, manifest {entry['bytes']})"
            )
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"bundle {root}: {rel} has been modified (sha256 does not match the manifest)")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise BundleError(f"bundle {root}: {unlisted[0]} is not in the manifest (unlisted files are refused)")


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and verify a bundle; raises BundleError naming the first problem. verify=False skips hashing
    (only for tools that inspect a bundle, never for serving)."""
    root = Path(path).resolve()
    manifest = _read_manifest(root)
    if verify:
        _check_files(root, manifest["files"], manifest["llm"]["layout"])
    try:
        config = GrokConfig.from_dict(manifest["config"])
        config.check()
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {root}: config in {MANIFEST} is invalid: {exc}") from exc
    return Bundle(root=root, manifest=manifest, config=config)
