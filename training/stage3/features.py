"""Frozen-encoder features for stage 3: 196 CFP + 196 OCT patch tokens per eye, computed once and cached.

The encoders are frozen in stage 3 (docs/domain.md, The GROK model), so their tokens are a pure function of (encoder
weights, image):
computing them once instead of every epoch makes CPU training of the phantom feasible, and it guarantees
the encoders cannot change. Images come from stage 2's preprocessing cache (`training.stage2.data.load_data`:
the runtime's own decoding, foveal B-scan choice and normalisation), so nothing is decoded twice.
The pooled features (mean of the tokens, what the biomarker heads read) are kept too.

Cache: `<cache_dir>/features-<hash>.safetensors`, the hash covering the manifest's image fingerprint and the
encoders' weights; a changed encoder or cohort gives a new file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from grok_pacs.domain.biomarkers import CFP_KEYS, OCT_KEYS

log = logging.getLogger(__name__)

FEATURES_VERSION = 1  #: bump when what is written to the cache changes
MODALITIES = ("CFP", "OCT")


def eye_id(subject_id: str, eye: str) -> str:
    """The key of one eye in the feature store (and of its stage-1 record)."""
    return f"{subject_id}_{eye}"


def module_digest(module: nn.Module) -> str:
    """A hash of a module's weights (names, shapes, values): changes when the encoder does."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class FeatureStore:
    """Per-eye patch tokens ([196, D] per modality) and pooled features ([D]), keyed by `eye_id`."""

    ids: list[str]
    cfp: torch.Tensor  #: [N, 196, D]
    oct: torch.Tensor  #: [N, 196, D]
    cfp_pooled: torch.Tensor  #: [N, D] float32
    oct_pooled: torch.Tensor  #: [N, D] float32

    def __post_init__(self) -> None:
        self._row = {rid: i for i, rid in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError("duplicate eye ids in the feature store")

    def row(self, rid: str) -> int:
        try:
            return self._row[rid]
        except KeyError:
            raise KeyError(
                f"no features for eye {rid!r} (is it in the manifest the features were computed from?)"
            ) from None

    def tokens(self, rid: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.row(rid)
        return self.cfp[i].float(), self.oct[i].float()

    def pooled(self, rid: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.row(rid)
        return self.cfp_pooled[i], self.oct_pooled[i]

    def missing(self, rid: str) -> tuple[str, ...]:
        """Modalities absent for this eye (a manifest eye always has both)."""
        self.row(rid)
        return ()

    def visual_tokens(self, rid: str) -> int:
        self.row(rid)
        return int(self.cfp.shape[1] + self.oct.shape[1])

    def save(self, path: Path) -> Path:
        tensors = {
            "cfp": self.cfp.contiguous(),
            "oct": self.oct.contiguous(),
            "cfp_pooled": self.cfp_pooled.contiguous(),
            "oct_pooled": self.oct_pooled.contiguous(),
        }
        tmp = Path(path).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"ids": json.dumps(self.ids), "version": str(FEATURES_VERSION)})
        tmp.replace(path)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> FeatureStore:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return cls(
            json.loads(meta["ids"]), tensors["cfp"], tensors["oct"], tensors["cfp_pooled"], tensors["oct_pooled"]
        )


@torch.no_grad()
def encode_images(
    encoder: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, desc: str, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N,3,224,224] -> tokens [N,196,D] and pooled [N,D] (float32), the encoder in eval mode, no grad."""
    encoder.eval()
    encoder.requires_grad_(False)
    tokens, pooled = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        out = encoder.forward_tokens(batch).float()
        tokens.append(out.cpu())
        pooled.append(out.mean(dim=1).cpu())
    return torch.cat(tokens), torch.cat(pooled)


@dataclass(frozen=True)
class EncodeOptions:
    """How the frozen encoders run: batch size, device, the dtype the tokens are stored in (part of the cache
    key) and progress bars."""

    batch_size: int = 32
    device: str = "cpu"
    token_dtype: torch.dtype = torch.float32
    progress: bool = True


def compute_features(
    manifest: Path,
    cfp_encoder: nn.Module,
    oct_encoder: nn.Module,
    cache_dir: Path,
    *,
    image_cache_dir: Path | None = None,
    options: EncodeOptions | None = None,
) -> FeatureStore:
    """Features of every eye of `manifest` (cached); the encoders are frozen and never updated here."""
    options = options or EncodeOptions()
    from training.manifest import load_manifest
    from training.stage2.data import load_data

    manifest = Path(manifest)
    cache_dir = Path(cache_dir)
    image_cache = Path(image_cache_dir) if image_cache_dir else cache_dir / "images"
    records = load_manifest(manifest)
    ids = [eye_id(r.subject_id, r.eye) for r in records]
    key = hashlib.sha256(
        json.dumps(
            [
                FEATURES_VERSION,
                str(options.token_dtype),
                module_digest(cfp_encoder),
                module_digest(oct_encoder),
                ids,
                manifest.read_text(),
            ]
        ).encode()
    )
    path = cache_dir / f"features-{key.hexdigest()[:16]}.safetensors"
    if path.is_file():
        log.info("stage 3: encoder features from cache %s", path)
        return FeatureStore.load(path)
    dev = torch.device(options.device)
    parts = {}
    for modality, encoder, keys in (("CFP", cfp_encoder, CFP_KEYS), ("OCT", oct_encoder, OCT_KEYS)):
        data = load_data(manifest, modality, keys, image_cache, progress=options.progress)
        if len(data.subjects) != len(ids):
            raise ValueError(f"{modality} image cache has {len(data.subjects)} eyes, the manifest {len(ids)}")
        encoder.to(dev)
        parts[modality] = encode_images(
            encoder, data.images, options.batch_size, dev, f"stage 3: {modality} encoder features", options.progress
        )
        encoder.to("cpu")
    tokens = {modality: part[0].to(options.token_dtype) for modality, part in parts.items()}
    store = FeatureStore(ids, tokens["CFP"], tokens["OCT"], parts["CFP"][1], parts["OCT"][1])
    cache_dir.mkdir(parents=True, exist_ok=True)
    store.save(path)
    return store
