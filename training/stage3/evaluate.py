"""Held-out evaluation of a stage-3 bundle through the runtime itself (`grok_pacs.analysis.engine.Engine`).

The benchmark must measure what a hospital would be served: the bundle is loaded and verified like the
worker does, each held-out eye goes through the same pixel reading, foveal B-scan choice, ONNX encoders,
heads, prompt, generation and report parsing. References are the stage-1 records of those eyes (reference
report and measured biomarkers); `training.benchmark.evaluate` scores the pairs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from grok_pacs.analysis.engine import Engine, EyeInput
from grok_pacs.analysis.result import Eye, Report
from training.records import Prediction, Reference, biomarkers_from_prompt_json
from training.stage3.data import load_instructions, record_label
from training.stage3.features import eye_id


class PromptWithoutEstimatesEngine(Engine):
    """The runtime engine for a bundle trained WITHOUT the biomarker block in its prompt.

    Only the prompt differs: the heads still run and their estimates still go to the report (and the SR).
    """

    def prompt_estimates(self, estimates: dict[str, float]) -> None:
        return None


def bundle_uses_estimates(bundle_dir: Path) -> bool:
    """Whether the bundle's stage 3 was trained with the biomarker estimates in the prompt (its provenance)."""
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    stage3 = manifest.get("provenance", {}).get("stage3", {})
    return bool(stage3.get("config", {}).get("biomarker_estimates", True))


def load_engine(bundle_dir: Path, threads: int = 0) -> Engine:
    """The CPU/GPU engine for a bundle, with the prompt its stage 3 was trained with."""
    cls = Engine if bundle_uses_estimates(bundle_dir) else PromptWithoutEstimatesEngine
    return cls.from_bundle(bundle_dir, threads=threads)


def references(instructions: Path, split: str = "test") -> list[Reference]:
    """The reference of every `split` eye: its label, stage-1 report and measured biomarkers."""
    out = []
    for record in load_instructions(instructions):
        if record.get("split") != split:
            continue
        reply = next(t["value"] for t in record["conversations"] if t.get("from") in ("gpt", "assistant"))
        out.append(
            Reference(
                case_id=eye_id(str(record["subject_id"]), str(record["eye"])),
                label=record_label(record),
                text=reply,
                biomarkers=biomarkers_from_prompt_json(record["biomarkers"]),
            )
        )
    if not out:
        raise ValueError(f"{instructions}: no records in the {split!r} split")
    return out


def _batches(subjects: list[list[str]], batch_eyes: int) -> list[list[str]]:
    """Whole subjects' eyes, grouped up to `batch_eyes` a batch (one subject a batch when it is <= 2)."""
    batches: list[list[str]] = []
    for cases in subjects:
        if batches and len(batches[-1]) + len(cases) <= batch_eyes:
            batches[-1] += cases
        else:
            batches.append(list(cases))
    return batches


def predict(
    engine: Engine, manifest: Path, case_ids: list[str], progress: bool = True, batch_eyes: int = 0
) -> tuple[list[Prediction], list[Report], float]:
    """Run the engine on the manifest's eyes `case_ids`; predictions, reports and seconds per eye.

    By default each subject's eyes go through the engine together, as a study's do in the runtime (so the
    seconds per eye are the runtime's). `batch_eyes` > 2 puts several subjects into one generation, for
    throughput where only the scores count (calibration): on 2 cores 8 eyes a batch take 4.6 s an eye
    against 7.0 s two at a time, with the same labels (greedy rows of a left-padded batch are independent)."""
    from training.manifest import load_manifest

    by_id = {eye_id(r.subject_id, r.eye): r for r in load_manifest(manifest)}
    missing = [c for c in case_ids if c not in by_id]
    if missing:
        raise ValueError(f"{manifest} lacks the eyes {missing[:3]}")
    # Both eyes of a subject go through the engine together, as a study does (one batched generation).
    by_subject: dict[str, list[str]] = {}
    for case in case_ids:
        by_subject.setdefault(by_id[case].subject_id, []).append(case)
    served: dict[str, Report] = {}
    started = time.monotonic()
    bar = tqdm(total=len(case_ids), desc=f"evaluate {engine.bundle.name}", unit="eye", disable=not progress)
    for cases in _batches(list(by_subject.values()), batch_eyes):
        eyes = [by_id[case] for case in cases]
        study = [EyeInput(Eye(r.eye), Path(r.cfp_path), Path(r.oct_path)) for r in eyes]
        served.update(zip(cases, engine.analyze_eyes(study)))
        bar.update(len(cases))
    bar.close()
    reports = [served[case] for case in case_ids]
    predictions = [Prediction.from_report(case, report) for case, report in zip(case_ids, reports)]
    return predictions, reports, (time.monotonic() - started) / max(len(case_ids), 1)
