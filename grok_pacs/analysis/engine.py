"""The runtime: one eye's CFP and/or OCT -> a typed `Report`, from a verified model bundle.

Steps: read pixels (grok_pacs.analysis.imaging) -> preprocess (CFP square/224/ImageNet; OCT foveal B-scan) -> ONNX
encoders (onnxruntime; CUDA provider only when present, no spin-waiting) -> biomarker heads (numpy) ->
prompt with the estimates -> Qwen2 + projectors (transformers; LoRA merged; greedy, bounded tokens) ->
grounding (a cited number that disagrees with its biomarker's estimate is written as the estimate,
grok_pacs.analysis.grounding; the model's words stay in `raw_text`) -> parse (grok_pacs.analysis.parsing) -> label
scores: each label's continuation after "Diagnosis:" scored in one batched pass over a shared prefill. The label is the model's diagnosis line when valid; otherwise the best
scored label when its probability reaches `min_label_probability`; otherwise Indeterminate.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from grok_pacs.domain.biomarkers import BY_KEY, Modality
from grok_pacs.analysis.bundle import Bundle, load_bundle
from grok_pacs.analysis.grounding import ground_cited_numbers
from grok_pacs.config import OPT
from grok_pacs.analysis.imaging import read_cfp, read_oct_volume
from grok_pacs.domain.labels import DIAGNOSTIC_LABELS, Label
from grok_pacs.model.grok import GrokModel
from grok_pacs.model.heads import BiomarkerHead, estimates_in_range
from grok_pacs.model.projector import Projectors
from grok_pacs.analysis.onnx_session import create_session, cuda_available, run_encoder
from grok_pacs.analysis.preprocess import preprocess_cfp, preprocess_oct, select_foveal_bscan
from grok_pacs.model.prompt import DIAGNOSIS_PREFIX, IM_END, IMAGE_TOKEN, build_prompt
from grok_pacs.analysis.result import BiomarkerEstimate, Eye, Report, SourceImage
from grok_pacs.analysis.parsing import parse_generation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EyeInput:
    """One eye of a study: its CFP and/or OCT file and the DICOM instances they came from."""

    eye: Eye
    cfp: Path | None = None
    oct: Path | None = None
    sources: tuple[SourceImage, ...] = ()


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch and onnxruntime both see CUDA, else "cpu"."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    return device


def load_llm(bundle: Bundle, device: str) -> torch.nn.Module:
    """The bundle's Qwen2, LoRA merged (merging a base + adapter bundle here), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    llm = bundle.manifest["llm"]
    if bundle.layout == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(bundle.path(llm["dir"])), local_files_only=True, dtype=dtype)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(bundle.path(llm["base_dir"])), local_files_only=True, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(bundle.path(llm["adapter_dir"]))).merge_and_unload()
    return model.to(device).eval()


class Engine:
    """A loaded bundle. Build with `Engine.from_bundle(path)`; thread-compatible, not thread-safe."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int = 0) -> None:
        from transformers import AutoTokenizer

        self.bundle = bundle
        self.device = resolve_device(device)
        self.config = bundle.config
        self.cfp_session = create_session(bundle.path(bundle.manifest["encoders"]["cfp"]["file"]), self.device, threads)
        self.oct_session = create_session(bundle.path(bundle.manifest["encoders"]["oct"]["file"]), self.device, threads)
        self.heads = {Modality.OCT: BiomarkerHead.load(bundle.path(bundle.manifest["heads"]["oct"])),
                      Modality.CFP: BiomarkerHead.load(bundle.path(bundle.manifest["heads"]["cfp"]))}
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle.path(bundle.manifest["tokenizer"])), local_files_only=True)
        projectors = Projectors.load(bundle.path(bundle.manifest["projectors"]), self.config.projector)
        llm = load_llm(bundle, self.device)
        self.model = GrokModel(llm, projectors.to(self.device), self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).eval()
        self.eos_id = int(self.tokenizer.convert_tokens_to_ids(IM_END))

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "auto", *, threads: int = 0) -> "Engine":
        """Verify (every sha256) and load a bundle; BundleError names a missing or modified file."""
        start = time.perf_counter()
        engine = cls(load_bundle(path), device, threads)
        log.info("bundle %s %s loaded on %s in %.1f s", engine.bundle.name, engine.bundle.version, engine.device,
                 time.perf_counter() - start)
        return engine

    # --- one eye -------------------------------------------------------------------------------------
    def analyze_eye(self, eye: Eye | str, cfp: Path | str | None = None, oct: Path | str | None = None, *,
                    sources: Sequence[SourceImage] = ()) -> Report:
        """Report for one eye from a CFP file and/or an OCT file (DICOM or images); at least one is needed."""
        start = time.perf_counter()
        image = read_cfp(cfp) if cfp is not None else None
        volume = read_oct_volume(oct) if oct is not None else None
        read_s = time.perf_counter() - start
        return self.analyze_images(eye, image, volume, sources=sources, timings={"read": read_s})

    def analyze_study(self, eyes: Iterable[EyeInput]) -> list[Report]:
        """One report per eye (a study with both eyes gives two)."""
        return [self.analyze_eye(e.eye, e.cfp, e.oct, sources=e.sources) for e in eyes]

    def analyze_images(self, eye: Eye | str, cfp_image: np.ndarray | None, oct_volume: np.ndarray | None, *,
                       sources: Sequence[SourceImage] = (), timings: dict[str, float] | None = None) -> Report:
        """Report for one eye from pixels: uint8 [H,W,3] CFP and/or [F,H,W] OCT volume."""
        if cfp_image is None and oct_volume is None:
            raise ValueError("analyze needs a CFP or an OCT for the eye; both are missing")
        timings = dict(timings or {})
        total = time.perf_counter()
        tokens, estimates, frame, method = self._encode(cfp_image, oct_volume, timings)
        missing = tuple(m for m, t in (("CFP", tokens["cfp"]), ("OCT", tokens["oct"])) if t is None)
        raw, scores = self._generate(tokens, estimates, missing, timings)
        grounded, rewritten = (ground_cited_numbers(raw, estimates) if self.config.generation.ground_numbers
                               else (raw, 0))
        if rewritten:
            log.info("grounding: %d cited number(s) rewritten to the estimates the SR carries", rewritten)
        parsed = parse_generation(grounded)
        label = parsed.label
        if label == Label.INDETERMINATE and scores:
            best = max(scores, key=scores.get)
            if scores[best] >= self.config.generation.min_label_probability:
                label = Label(best)
        timings["total"] = time.perf_counter() - total + timings.get("read", 0.0)
        impression = parsed.impression or (f"Diagnosis: {label.value}" if label != Label.INDETERMINATE
                                           else "No diagnosis could be determined.")
        return Report(
            eye=Eye(eye), label=label, narrative=parsed.narrative, impression=impression, raw_text=raw,
            biomarkers=tuple(BiomarkerEstimate(k, v, BY_KEY[k].unit) for k, v in estimates.items()),
            cited_numbers=parsed.cited_numbers, label_scores=scores, missing_modalities=missing,
            sources=tuple(dataclasses.replace(s, frame=frame + 1) if s.sop_class_uid == OPT and frame is not None
                          else s for s in sources),
            oct_frame_index=frame, oct_frame_method=method, bundle_name=self.bundle.name,
            bundle_version=self.bundle.version, timings_s=timings, numbers_rewritten=rewritten)

    # --- steps ---------------------------------------------------------------------------------------
    def _encode(self, cfp_image: np.ndarray | None, oct_volume: np.ndarray | None, timings: dict[str, float]):
        tokens: dict[str, np.ndarray | None] = {"cfp": None, "oct": None}
        estimates: dict[str, float] = {}
        frame = method = None
        if cfp_image is not None:
            t = time.perf_counter()
            pixels = preprocess_cfp(cfp_image)[None]
            timings["preprocess_cfp"] = time.perf_counter() - t
            t = time.perf_counter()
            cfp_tokens, pooled = run_encoder(self.cfp_session, pixels)
            timings["cfp_encoder"] = time.perf_counter() - t
            tokens["cfp"] = cfp_tokens[0]
            estimates.update(self.heads[Modality.CFP].predict_dict(pooled[0]))
        if oct_volume is not None:
            t = time.perf_counter()
            frame, method = select_foveal_bscan(oct_volume)
            pixels = preprocess_oct(oct_volume[frame])[None]
            timings["preprocess_oct"] = time.perf_counter() - t
            t = time.perf_counter()
            oct_tokens, pooled = run_encoder(self.oct_session, pixels)
            timings["oct_encoder"] = time.perf_counter() - t
            tokens["oct"] = oct_tokens[0]
            oct_values = self.heads[Modality.OCT].predict_dict(pooled[0])
            estimates = {**oct_values, **estimates}  # OCT first, then CFP: the schema's order
        return tokens, estimates_in_range(estimates), frame, method

    def _visual(self, tokens: dict[str, np.ndarray | None]) -> tuple[list, list]:
        def one(value: np.ndarray | None) -> list:
            return [None if value is None else torch.from_numpy(value).to(self.device)]
        return one(tokens["cfp"]), one(tokens["oct"])

    def _generate(self, tokens, estimates, missing, timings) -> tuple[str, dict[str, float]]:
        gen = self.config.generation
        prompt = build_prompt(estimates if gen.biomarkers_in_prompt else None, missing,
                              compact=gen.compact_biomarkers)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        cfp, oct = self._visual(tokens)
        t = time.perf_counter()
        out = self.model.generate(ids, cfp_tokens=cfp, oct_tokens=oct, max_new_tokens=gen.max_new_tokens,
                                  temperature=gen.temperature, eos_token_id=self.eos_id,
                                  pad_token_id=self.tokenizer.pad_token_id or self.eos_id)
        timings["generate"] = time.perf_counter() - t
        raw = self.tokenizer.decode(out[0], skip_special_tokens=True)
        scores: dict[str, float] = {}
        if gen.score_labels:
            t = time.perf_counter()
            scores = self.label_scores(ids, cfp, oct, parse_generation(raw).narrative)
            timings["label_scores"] = time.perf_counter() - t
        return raw, scores

    @torch.no_grad()
    def label_scores(self, prompt_ids: torch.Tensor, cfp: list, oct: list, narrative: str) -> dict[str, float]:
        """P(label | prompt, narrative, "Diagnosis:") over the 7 labels: one prefill, 7 batched continuations."""
        prefix = self.tokenizer(f"{narrative}\n{DIAGNOSIS_PREFIX}", add_special_tokens=False,
                                return_tensors="pt")["input_ids"].to(self.device)
        inputs = self.model.splice(torch.cat([prompt_ids, prefix], dim=1), None, None, cfp, oct)
        llm = self.model.llm
        params = inspect.signature(llm.forward).parameters
        first = llm(**inputs, use_cache=True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {}))
        new_api = "cache" in params  # newer transformers call it `cache`
        cache = first.cache if new_api else first.past_key_values
        options = [self.tokenizer(f" {label.value}{IM_END}", add_special_tokens=False)["input_ids"]
                   for label in DIAGNOSTIC_LABELS]
        width = max(len(o) for o in options)
        batch = torch.full((len(options), width), self.eos_id, dtype=torch.long, device=self.device)
        for i, option in enumerate(options):
            batch[i, : len(option)] = torch.tensor(option)
        cache.batch_repeat_interleave(len(options))
        key = "cache" if new_api else "past_key_values"
        rest = llm(input_ids=batch, use_cache=True, **{key: cache})
        logprobs = torch.cat([first.logits[:, -1:].expand(len(options), -1, -1), rest.logits[:, :-1]], 1).float()
        logprobs = logprobs.log_softmax(-1).gather(-1, batch[..., None])[..., 0]
        totals = torch.stack([logprobs[i, : len(o)].sum() for i, o in enumerate(options)])
        probs = totals.softmax(0).tolist()
        return {label.value: float(p) for label, p in zip(DIAGNOSTIC_LABELS, probs)}
