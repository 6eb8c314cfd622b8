"""The runtime: each eye's CFP and/or OCT -> a typed `Report`, from a verified model bundle.

Steps: read pixels (grok_pacs.analysis.imaging) -> preprocess (CFP square/224/ImageNet; OCT foveal B-scan) ->
ONNX encoders (onnxruntime; CUDA provider only when present, no spin-waiting) -> biomarker heads (numpy) ->
prompt with the estimates (and the pattern head's closest label, grok_pacs.model.pattern) -> Qwen2 +
projectors (transformers; LoRA merged; greedy, bounded, guarded: grok_pacs.analysis.decoding), all eyes of
a call in ONE batched generation and ONE batched label scoring (continuing the generation's key/value cache
after each eye's own "Diagnosis:", so prompt and findings are not read twice) -> validation of the model's text
(grok_pacs.analysis.validation, counted in /metrics) -> a failed text written again, alone, up to
`GenerationConfig.retries` times (grok_pacs.analysis.rewrite) -> grounding (a cited number that disagrees with its
biomarker's estimate is written as the estimate, grok_pacs.analysis.grounding; the model's words stay in
`raw_text`) -> parse (grok_pacs.analysis.parsing).

The label rule (grok_pacs.analysis.label_rule): with a decision classifier in the bundle
(grok_pacs.model.decision) it decides, its label is the prompt's last line, and it is stated only when its
calibrated probability reaches the operating point and the validated findings conclude the same label;
without one the language model decides (the paper's configuration): its findings' label, or its best
calibrated scored label, at or above the operating point (`min_label_probability`, a site setting over the
bundle's). Otherwise Indeterminate; uncalibrated scores never decide. A generation that failed
validation (and every retry of it) is never shipped as the model's findings: the Report's narrative is
empty, its impression states the label only, `narrative_check` says why, and `raw_text` keeps the words
for audit.

With an OOD model in the bundle (grok_pacs.analysis.ood), an eye whose CFP or OCT encoder features lie
outside the training features' distribution is left Indeterminate whatever the rule above gave, its
impression saying why ("image unlike the training images (device shift)") and `Report.shift_scores`
by how much; the findings are kept for review.

The gradability gate (grok_pacs.analysis.quality) runs before the engine, in the per-study job
(grok_pacs.jobs.eye_analysis): only gradable images reach `analyze_batch` there. Direct engine calls
(training evaluation, benchmarks on phantom eyes) are not gated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grok_pacs.analysis.bundle import Bundle, BundleError, load_bundle
from grok_pacs.analysis.decoding import Decoder
from grok_pacs.analysis.estimate_error import load_estimate_errors
from grok_pacs.analysis.grounding import ground_cited_numbers
from grok_pacs.analysis.imaging import EyeImages, read_cfp, read_oct_volume
from grok_pacs.analysis.label_calibration import load_calibration
from grok_pacs.analysis.label_rule import classifier_rule, lm_rule
from grok_pacs.analysis.llm_loading import load_llm, resolve_device
from grok_pacs.analysis.onnx_session import create_session, run_encoder
from grok_pacs.analysis.ood import load_ood, ood_impression
from grok_pacs.analysis.parsing import parse_generation
from grok_pacs.analysis.preprocess import preprocess_cfp, preprocess_oct, select_foveal_bscan
from grok_pacs.analysis.quality_head import load_quality_head
from grok_pacs.analysis.result import (
    DECIDER_CLASSIFIER,
    DECIDER_LM,
    BiomarkerEstimate,
    Eye,
    NarrativeCheck,
    NarrativeReason,
    Report,
    SourceImage,
)
from grok_pacs.analysis.rewrite import second_attempts
from grok_pacs.analysis.validation import validate_narrative
from grok_pacs.dicom.sop_classes import OPT
from grok_pacs.domain.biomarkers import BY_KEY, Modality
from grok_pacs.domain.labels import Label
from grok_pacs.model.decision import load_decision
from grok_pacs.model.grok import GrokModel
from grok_pacs.model.heads import BiomarkerHead, estimates_in_range
from grok_pacs.model.pattern import load_pattern_head
from grok_pacs.model.precision import resolve_precision
from grok_pacs.model.projector import Projectors
from grok_pacs.model.prompt import IM_END, IMAGE_TOKEN, build_prompt
from grok_pacs.ops import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EyeInput:
    """One eye of a study: its CFP and/or OCT file and the DICOM instances they came from."""

    eye: Eye
    cfp: Path | None = None
    oct: Path | None = None
    sources: tuple[SourceImage, ...] = ()


class Engine:
    """A loaded bundle. Build with `Engine.from_bundle(path)`; thread-compatible, not thread-safe."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        threads: int = 0,
        *,
        min_label_probability: float | None = None,
        llm_precision: str = "auto",
    ) -> None:
        from transformers import AutoTokenizer

        self.bundle = bundle
        self.calibration = load_calibration(bundle.root, bundle.manifest)  # None: scores stay uncalibrated
        self.quality_head = load_quality_head(bundle.root, bundle.manifest)  # None: the rule-based gate only
        self.ood = load_ood(bundle.root, bundle.manifest)  # None: no device-shift check
        self.estimate_errors = load_estimate_errors(bundle.root, bundle.manifest)  # None: errors unknown
        self.pattern_head = load_pattern_head(bundle.root, bundle.manifest)  # None: no pattern line in the prompt
        self.decision = load_decision(bundle.root, bundle.manifest)  # None: the language model decides the label
        lined = self.pattern_head is not None or (self.decision is not None and self.decision.prompt_line)
        if lined and not bundle.config.generation.compact_biomarkers:
            raise BundleError(f"{bundle.root}: a prompt line needs a model trained with the compact biomarker block")
        self._min_label_probability = min_label_probability  # site setting; None: the bundle's
        self.device = resolve_device(device)
        self.config = bundle.config
        self.cfp_session = create_session(bundle.path(bundle.manifest["encoders"]["cfp"]["file"]), self.device, threads)
        self.oct_session = create_session(bundle.path(bundle.manifest["encoders"]["oct"]["file"]), self.device, threads)
        self.heads = {
            Modality.OCT: BiomarkerHead.load(bundle.path(bundle.manifest["heads"]["oct"])),
            Modality.CFP: BiomarkerHead.load(bundle.path(bundle.manifest["heads"]["cfp"])),
        }
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(bundle.path(bundle.manifest["tokenizer"])), local_files_only=True
        )
        projectors = Projectors.load(bundle.path(bundle.manifest["projectors"]), self.config.projector)
        # bf16 on a GPU, fp32 on a CPU unless the site forces bf16 (grok_pacs.model.precision says why)
        self.llm_precision = resolve_precision(llm_precision, self.device)
        llm = load_llm(bundle, self.device, self.llm_precision)
        self.model = GrokModel(
            llm, projectors.to(self.device), self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        ).eval()
        self.eos_id = int(self.tokenizer.convert_tokens_to_ids(IM_END))
        self.decoder = Decoder(self.model, self.tokenizer, self.eos_id, self.device)
        metrics.narrative_reasons(reason.value for reason in NarrativeReason)

    @property
    def operating_point(self) -> float:
        """The Indeterminate threshold: the site's setting when given, else the bundle's (its decision
        classifier's, chosen on validation; without one, its generation config's)."""
        site = self._min_label_probability
        if site is not None:
            return float(site)
        if self.decision is not None:
            return self.decision.operating_point
        return self.config.generation.min_label_probability

    @property
    def decider(self) -> str:
        """Which component decides the label: the decision classifier when the bundle has one."""
        return DECIDER_CLASSIFIER if self.decision is not None else DECIDER_LM

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        device: str = "auto",
        *,
        threads: int = 0,
        min_label_probability: float | None = None,
        llm_precision: str = "auto",
    ) -> Engine:
        """Verify (every sha256) and load a bundle; BundleError names a missing or modified file."""
        start = time.perf_counter()
        engine = cls(
            load_bundle(path),
            device,
            threads,
            min_label_probability=min_label_probability,
            llm_precision=llm_precision,
        )
        log.info(
            "bundle %s %s loaded on %s (LLM in %s) in %.1f s",
            engine.bundle.name,
            engine.bundle.version,
            engine.device,
            engine.llm_precision,
            time.perf_counter() - start,
        )
        return engine

    # --- eyes ---------------------------------------------------------------------------------------
    def analyze_eye(
        self,
        eye: Eye | str,
        cfp: Path | str | None = None,
        oct: Path | str | None = None,
        *,
        sources: Sequence[SourceImage] = (),
    ) -> Report:
        """Report for one eye from a CFP file and/or an OCT file (DICOM or images); at least one is needed."""
        return self.analyze_eyes([EyeInput(Eye(eye), cfp, oct, tuple(sources))])[0]

    def analyze_eyes(self, eyes: Iterable[EyeInput]) -> list[Report]:
        """One report per eye from files (a study with both eyes gives two), all eyes in one batched
        generation. Not the Celery task `grok_pacs.jobs.tasks.analyze_study`, which runs a whole study job."""
        batch = []
        for item in eyes:
            start = time.perf_counter()
            image = read_cfp(item.cfp) if item.cfp is not None else None
            volume = read_oct_volume(item.oct) if item.oct is not None else None
            batch.append(EyeImages(item.eye, image, volume, tuple(item.sources), {"read": time.perf_counter() - start}))
        return self.analyze_batch(batch)

    def analyze_images(
        self,
        eye: Eye | str,
        cfp_image: np.ndarray | None,
        oct_volume: np.ndarray | None,
        *,
        sources: Sequence[SourceImage] = (),
        timings: dict[str, float] | None = None,
    ) -> Report:
        """Report for one eye from pixels: uint8 [H,W,3] CFP and/or [F,H,W] OCT volume."""
        return self.analyze_batch([EyeImages(Eye(eye), cfp_image, oct_volume, tuple(sources), dict(timings or {}))])[0]

    def analyze_batch(self, eyes: Sequence[EyeImages]) -> list[Report]:
        """One report per eye: encoders per image, then ONE generation and ONE label scoring for all eyes.

        Timings: "generate" and "label_scores" are the batch's seconds (shared by its eyes); "total" is
        the eye's reading plus the whole batch.
        """
        start = time.perf_counter()
        timings = [dict(item.timings) for item in eyes]
        pooled: list[dict[str, np.ndarray]] = [{} for _ in eyes]  # per eye: modality -> pooled feature
        encoded = [
            self._encode(item.cfp_image, item.oct_volume, timing, feats)
            for item, timing, feats in zip(eyes, timings, pooled)
        ]
        gen = self.config.generation
        missing = [tuple(m for m in ("CFP", "OCT") if tokens[m.lower()] is None) for tokens, *_ in encoded]
        ids = self.decoder.encode([self.prompt(estimates, gone) for (_, estimates, *_), gone in zip(encoded, missing)])
        cfp, oct = self._visual([tokens for tokens, *_ in encoded])
        t = time.perf_counter()
        generation = self.decoder.generate(ids, cfp, oct, gen, keep_cache=gen.score_labels) if eyes else None
        raws = list(generation.texts) if generation is not None else []  # a retry replaces a row's text
        shared = {"generate": time.perf_counter() - t}
        estimates = [values for _, values, *_ in encoded]
        checks = [self._validate(item.eye, raw, values) for item, raw, values in zip(eyes, raws, estimates)]
        raw_scores: list[dict[str, float]] = [{} for _ in eyes]
        if gen.score_labels and eyes:
            t = time.perf_counter()
            raw_scores = self.decoder.scores_after_generation(generation)  # continues the generation's cache
            if raw_scores is None:  # a row without a diagnosis line: score its parsed narrative from scratch
                raw_scores = self.decoder.label_scores(ids, cfp, oct, [parse_generation(raw).narrative for raw in raws])
            shared["label_scores"] = time.perf_counter() - t
        t = time.perf_counter()
        firsts = second_attempts(  # rows whose retry passed are replaced in raws, checks and raw_scores
            self.decoder,
            gen,
            [item.eye for item in eyes],
            list(zip(ids, cfp, oct)),
            estimates,
            (raws, checks, raw_scores),
            lambda i, text: self._validate(eyes[i].eye, text, estimates[i]),
        )
        if firsts:
            shared["retry"] = time.perf_counter() - t
        calibrate = self.calibration is not None and gen.score_labels
        scores = [self.calibration.apply(s) for s in raw_scores] if calibrate else raw_scores
        batch_s = time.perf_counter() - start
        for timing in timings:
            timing.update(shared)
            timing["total"] = batch_s + timing.get("read", 0.0)
        reports = [
            self._report(*args) for args in zip(eyes, encoded, missing, raws, checks, scores, raw_scores, timings)
        ]
        reports = [
            dataclasses.replace(r, first_attempt=firsts[i][0], first_attempt_text=firsts[i][1]) if i in firsts else r
            for i, r in enumerate(reports)
        ]
        return [self._shift_checked(report, feats) for report, feats in zip(reports, pooled)]

    def _shift_checked(self, report: Report, pooled: dict[str, np.ndarray]) -> Report:
        """The report with its shift scores; Indeterminate, saying why, when an image is unlike the training
        images (grok_pacs.analysis.ood). Unchanged for a bundle without an OOD model."""
        if self.ood is None:
            return report
        scores = self.ood.scores({m: f for m, f in pooled.items() if m in self.ood.models})
        impression = ood_impression(scores)
        if impression is None:
            return dataclasses.replace(report, shift_scores=scores)
        log.info("eye %s: image unlike the training images (shift scores %s)", report.eye.value, scores)
        return dataclasses.replace(report, label=Label.INDETERMINATE, impression=impression, shift_scores=scores)

    @staticmethod
    def _validate(eye: Eye, raw: str, estimates: dict[str, float]) -> NarrativeCheck:
        """Validate one generation and count a failure's reasons in /metrics; a failure is logged by reason
        code only (no report text in logs)."""
        check = validate_narrative(raw, estimates)
        if not check.passed:
            metrics.narrative_failed([reason.value for reason in check.reasons])
            log.warning(
                "eye %s: a generation failed validation: %s",
                eye.value,
                ", ".join(reason.value for reason in check.reasons),
            )
        return check

    def prompt_estimates(self, estimates: dict[str, float]) -> dict[str, float] | None:
        """The estimates the prompt carries (None when the bundle's stage 3 was trained without them)."""
        return estimates if self.config.generation.biomarkers_in_prompt else None

    def prompt(self, estimates: dict[str, float], missing: Sequence[str] = ()) -> str:
        """One eye's generation prompt, as the bundle's stage 3 trained it: the estimates (when it was trained
        with them) and its last line, the decision classifier's label (or an older bundle's pattern head's)."""
        gen = self.config.generation
        values = self.prompt_estimates(estimates)
        pattern = None
        if values and self.decision is not None and self.decision.prompt_line:
            pattern = self.decision.decide(values).label
        elif values and self.pattern_head is not None:
            pattern = self.pattern_head.closest(values)
        return build_prompt(
            values, missing, compact=gen.compact_biomarkers, pattern=pattern, pattern_subtype=gen.pattern_subtype
        )

    def _report(
        self,
        item: EyeImages,
        encoded: tuple,
        missing: tuple[str, ...],
        raw: str,
        check: NarrativeCheck,
        scores: dict[str, float],
        raw_scores: dict[str, float],
        timings: dict[str, float],
    ) -> Report:
        """The Report of one eye, by the label rule of the module docstring."""
        _, estimates, frame, method = encoded
        narrative, impression, cited, rewritten, concluded = "", "", (), 0, None
        if check.passed:  # only a validated text is shipped as the model's findings
            grounded, rewritten = (
                ground_cited_numbers(raw, estimates) if self.config.generation.ground_numbers else (raw, 0)
            )
            if rewritten:
                log.info("grounding: %d cited number(s) rewritten to the estimates the SR carries", rewritten)
            parsed = parse_generation(grounded)
            narrative, impression, cited = parsed.narrative, parsed.impression, parsed.cited_numbers
            concluded = parsed.label if parsed.label_found else None
        decision = self.decision.decide(estimates) if self.decision is not None and estimates else None
        if decision is None:
            calibrated = self.calibration is not None
            label, impression, unsupported = lm_rule(concluded, impression, scores, calibrated, self.operating_point)
            stated_scores, lm_scores = scores, {}
        else:
            label, impression, unsupported = classifier_rule(decision, concluded, impression, self.operating_point)
            stated_scores, lm_scores, calibrated = decision.probabilities, scores, True
        impression = impression or (
            f"Diagnosis: {label.value}" if label != Label.INDETERMINATE else "No diagnosis could be determined."
        )
        return Report(
            eye=item.eye,
            label=label,
            narrative=narrative,
            impression=impression,
            raw_text=raw,
            biomarkers=tuple(BiomarkerEstimate(k, v, BY_KEY[k].unit, self._error(k)) for k, v in estimates.items()),
            cited_numbers=cited,
            label_scores=stated_scores,
            missing_modalities=missing,
            sources=tuple(
                dataclasses.replace(s, frame=frame + 1) if s.sop_class_uid == OPT and frame is not None else s
                for s in item.sources
            ),
            oct_frame_index=frame,
            oct_frame_method=method,
            bundle_name=self.bundle.name,
            bundle_version=self.bundle.version,
            timings_s=timings,
            numbers_rewritten=rewritten,
            narrative_check=check,
            probabilities_calibrated=bool(stated_scores) and calibrated,
            uncalibrated_scores=raw_scores,
            operating_point=self.operating_point,
            unsupported_label=unsupported,
            decided_by=DECIDER_CLASSIFIER if decision is not None else DECIDER_LM,
            lm_label=concluded,
            lm_scores=lm_scores,
        )

    def _error(self, key: str) -> float | None:
        return None if self.estimate_errors is None else self.estimate_errors.errors.get(key)

    # --- steps ---------------------------------------------------------------------------------------
    def pooled_feature(self, modality: str, pixels: np.ndarray) -> np.ndarray:
        """The encoder's pooled feature [D] of a CFP (uint8 RGB) or an OCT volume (its foveal B-scan)."""
        if modality == "CFP":
            return run_encoder(self.cfp_session, preprocess_cfp(pixels)[None])[1][0]
        frame, _ = select_foveal_bscan(pixels)
        return run_encoder(self.oct_session, preprocess_oct(pixels[frame])[None])[1][0]

    def biomarker_estimates(self, cfp_image: np.ndarray | None, oct_volume: np.ndarray | None) -> dict[str, float]:
        """The heads' estimates for one eye (encoders and heads only: no generation)."""
        return self._encode(cfp_image, oct_volume, {})[1]

    def learned_ungradability(self, modality: str, pixels: np.ndarray) -> float | None:
        """P(ungradable) from the bundle's learned quality head (an extra encoder pass); None without one."""
        model = self.quality_head.models.get(modality) if self.quality_head is not None else None
        return None if model is None else model.probability(self.pooled_feature(modality, pixels))

    def _encode(
        self,
        cfp_image: np.ndarray | None,
        oct_volume: np.ndarray | None,
        timings: dict[str, float],
        pooled_out: dict[str, np.ndarray] | None = None,
    ):
        """(tokens, estimates, frame, method) of one eye; `pooled_out` receives each modality's pooled feature."""
        pooled_out = {} if pooled_out is None else pooled_out
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
            tokens["cfp"], pooled_out["CFP"] = cfp_tokens[0], pooled[0]
            estimates.update(self.heads[Modality.CFP].estimate(pooled[0], cfp_tokens[0]))
        if oct_volume is not None:
            t = time.perf_counter()
            frame, method = select_foveal_bscan(oct_volume)
            pixels = preprocess_oct(oct_volume[frame])[None]
            timings["preprocess_oct"] = time.perf_counter() - t
            t = time.perf_counter()
            oct_tokens, pooled = run_encoder(self.oct_session, pixels)
            timings["oct_encoder"] = time.perf_counter() - t
            tokens["oct"], pooled_out["OCT"] = oct_tokens[0], pooled[0]
            oct_values = self.heads[Modality.OCT].estimate(pooled[0], oct_tokens[0])
            estimates = {**oct_values, **estimates}  # OCT first, then CFP: the schema's order
        return tokens, estimates_in_range(estimates), frame, method

    def _visual(self, tokens: list[dict[str, np.ndarray | None]]) -> tuple[list, list]:
        """Per-row CFP and OCT token tensors on the device (None for a missing modality)."""

        def rows(name: str) -> list:
            return [None if t[name] is None else torch.from_numpy(t[name]).to(self.device) for t in tokens]

        return rows("cfp"), rows("oct")
