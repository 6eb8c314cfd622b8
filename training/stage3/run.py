"""Stage 3 end to end: instructions + cohort + stage-2 encoders/heads -> adapter, projectors, merged LLM.

Steps (each reuses its output when it is already there, so an interrupted run continues):
1. tokenizer: the one in `cfg.tokenizer_dir`, else the base LLM's, else a phantom BPE trained on the
   training split's conversations (`training.tokenizer`);
2. LLM base: `cfg.base_llm_dir` (real Qwen2), else the stand-in tiny Qwen2 pretrained on the training split's
   conversations (`pretrain_llm`, documented as a stand-in);
3. frozen-encoder features for every eye (`features`), and, with `cfg.biomarker_estimates`, the biomarker
   heads' predictions for every eye (what the runtime will put in the prompt), and with `cfg.pattern_head`
   the decision classifier (`training.stage3.crossfit`: fitted on the training eyes' cross-fitted estimates,
   temperature and operating point on the validation eyes; `decision.json`, packed into the bundle): the
   training eyes' prompts then carry their served estimates and a decided label from a classifier that did
   not see them (fitted on the other folds' cross-fitted estimates), so the LM trains on label lines as
   often wrong as served ones (both in `decide`);
4. LoRA SFT (`train`) on the `train` split, validation loss on `val`;
5. outputs: `adapter/` (PEFT), `projectors.safetensors`, `llm_merged/` (LoRA merged, what the bundle
   serves), `stage3.json` (config, losses, timings); their layout and reading them back are in `result`,
   packing them into the servable bundle in `bundle`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from grok_pacs.model.checkpoints import load_encoder
from grok_pacs.model.config import GrokConfig
from grok_pacs.model.grok import GrokModel, ensure_image_token
from grok_pacs.model.projector import Projectors
from grok_pacs.model.prompt import build_prompt
from training import distributed
from training.records import biomarkers_from_prompt_json
from training.stage3.bundle import grok_config, llm_source, projector_config
from training.stage3.checkpoint import latest_checkpoint, load_trainable
from training.stage3.config import Stage3Config
from training.stage3.data import SFTDataset, build_samples, chat_text, load_instructions
from training.stage3.decide import fit_decision, head_estimates
from training.stage3.features import EncodeOptions, compute_features, eye_id
from training.stage3.lora import attach_lora, load_base_llm, save_adapter
from training.stage3.pretrain_llm import STAND_IN_FILE, pretrain_stand_in
from training.stage3.result import (
    ADAPTER_DIR,
    MERGED_DIR,
    PROJECTORS_FILE,
    REPORT_JSON,
    STAND_IN_DIR,
    TOKENIZER_DIR,
    Stage3Inputs,
    Stage3Result,
)
from training.stage3.targets import concise_measured, estimate_grounded, jittered_variants
from training.stage3.train import SFTTrainer, TrainResult
from training.tokenizer import load_tokenizer, save_tokenizer, train_phantom_tokenizer

log = logging.getLogger(__name__)


def record_eye_id(record: Mapping[str, Any]) -> str:
    """The feature-store key of a stage-1 record: its subject and eye when given, else its id."""
    if "subject_id" in record and "eye" in record:
        return eye_id(str(record["subject_id"]), str(record["eye"]))
    return str(record["id"])


def split_records(records: list[dict], manifest: Path) -> dict[str, list[dict]]:
    """Records by the manifest's split of their eye (train / val / test); unknown eyes are an error."""
    from training.manifest import load_manifest

    split_of = {eye_id(r.subject_id, r.eye): r.split for r in load_manifest(manifest)}
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for record in records:
        key = record_eye_id(record)
        if key not in split_of:
            raise ValueError(f"instruction record {record.get('id')!r} (eye {key}) is not in {manifest}")
        out[split_of[key]].append({**record, "id": key})
    return out


def balanced_subset(records: list[dict], limit: int) -> list[dict]:
    """At most `limit` records (0 = all), taken round-robin over the labels in the records' order, so every
    label keeps its share; deterministic (the order is the stage-1 file's)."""
    if not limit or len(records) <= limit:
        return records
    by_label: dict[str, list[dict]] = {}
    for record in records:
        by_label.setdefault(str(record["label"]), []).append(record)
    queues = [list(group) for group in by_label.values()]
    picked: list[dict] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    chosen = {id(r) for r in picked}
    return [r for r in records if id(r) in chosen]


def prepare_tokenizer(cfg: Stage3Config, train_records: list[dict], instructions: Path, out_dir: Path) -> Any:
    """The tokenizer stage 3 trains with, saved under out_dir/tokenizer (what the bundle ships)."""
    target = out_dir / TOKENIZER_DIR
    source = cfg.tokenizer_dir or cfg.base_llm_dir
    if source is not None:
        tokenizer = load_tokenizer(source)
        save_tokenizer(tokenizer, target)
        return tokenizer
    if (target / "tokenizer.json").is_file():
        return load_tokenizer(target)
    texts = [turn["value"] for r in train_records for turn in r["conversations"]]
    # The biomarker block of the prompt (names, units, qualitative words) must tokenize compactly too.
    texts += [build_prompt(biomarkers_from_prompt_json(r["biomarkers"])) for r in train_records if "biomarkers" in r]
    train_phantom_tokenizer([], target, vocab_size=cfg.tokenizer_vocab_size, extra_texts=texts)
    return load_tokenizer(target)


def prepare_llm(
    cfg: Stage3Config, tokenizer: Any, train_records: list[dict], out_dir: Path, dtype: torch.dtype, progress: bool
) -> tuple[Any, Path]:
    """The frozen LLM base (real weights, or the stand-in pretrained once) and the directory it came from."""
    if cfg.base_llm_dir is not None:
        return load_base_llm(cfg.base_llm_dir, dtype), Path(cfg.base_llm_dir)
    stand_in = out_dir / STAND_IN_DIR
    if not (stand_in / STAND_IN_FILE).is_file():
        pretrain_stand_in(
            pretraining_texts(cfg, train_records), tokenizer, cfg.stand_in, stand_in, seed=cfg.seed, progress=progress
        )
    return load_base_llm(stand_in, dtype), stand_in


def pretraining_texts(cfg: Stage3Config, records: list[dict]) -> list[str]:
    """The stand-in's corpus: the training conversations in stage 3's prompt format.

    With `biomarker_estimates`, the prompt carries the eye's measured biomarkers, which its stage-1 report
    cites: the stand-in learns the language of the reports and to cite the numbers its prompt gives. The
    corpus also holds `stand_in.jittered_copies` teacher-written variants of each guideline record
    (`targets.jittered_variants`).
    """
    pairs = [(r, biomarkers_from_prompt_json(r["biomarkers"])) for r in records]
    pairs += jittered_variants(records, cfg.stand_in.jittered_copies, cfg.stand_in.jitter, seed=cfg.seed)
    return [chat_text(record, values if cfg.biomarker_estimates else None) for record, values in pairs]


def run(
    cfg: Stage3Config, inputs: Stage3Inputs, out_dir: Path, *, resume: bool = True, progress: bool = True
) -> Stage3Result | None:
    """Train stage 3 and write its outputs to `out_dir` (see the module docstring).

    Under torchrun every rank trains its share; rank 0 writes the outputs and the others get None.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 prepares first (tokenizer, stand-in LLM, features); the others reuse its caches
    splits = split_records(load_instructions(inputs.instructions), inputs.manifest)
    if not splits["train"]:
        raise ValueError(f"{inputs.manifest}: no eyes in the train split")
    all_train = splits["train"]  # the pattern head is fitted on every training eye
    splits["train"] = balanced_subset(splits["train"], cfg.max_train_records)
    splits["val"] = balanced_subset(splits["val"], cfg.max_val_records)
    tokenizer = prepare_tokenizer(cfg, splits["train"], inputs.instructions, out_dir)
    llm_dtype = (
        torch.bfloat16
        if (
            cfg.precision != "fp32"
            and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported()
            and not cfg.uses_stand_in
        )
        else torch.float32
    )
    timings = {"setup_s": time.monotonic() - started}
    llm, base_dir = prepare_llm(cfg, tokenizer, splits["train"], out_dir, llm_dtype, progress)
    timings["llm_base_s"] = time.monotonic() - started - timings["setup_s"]
    image_id = ensure_image_token(tokenizer, llm)
    cfp_encoder, oct_encoder = load_encoder(inputs.cfp_encoder), load_encoder(inputs.oct_encoder)
    t0 = time.monotonic()
    store = compute_features(
        inputs.manifest,
        cfp_encoder,
        oct_encoder,
        out_dir / "features",
        image_cache_dir=inputs.image_cache_dir,
        options=EncodeOptions(device="cuda" if torch.cuda.is_available() else "cpu", progress=progress),
    )
    timings["features_s"] = time.monotonic() - t0
    estimates = head_estimates(store, inputs.cfp_head, inputs.oct_head) if cfg.biomarker_estimates else None
    decided = None
    if cfg.pattern_head and estimates:  # the decision classifier; training eyes read cross-fitted estimates
        estimates, decided = fit_decision(cfg, all_train, estimates, store, inputs, out_dir)
    datasets = {}
    for split in ("train", "val"):
        if estimates is not None:
            records = estimate_grounded(splits[split], estimates, concise=cfg.concise_reports)
        else:
            records = concise_measured(splits[split]) if cfg.concise_reports else splits[split]
        samples = build_samples(
            records,
            tokenizer,
            store,
            max_length=cfg.max_length,
            estimates=estimates,
            compact=cfg.compact_biomarkers,
            pattern=decided,
            pattern_subtype=cfg.pattern_subtype,
        )
        truncated = sum(s.truncated for s in samples)
        if truncated:
            log.warning("stage 3: %d %s targets were cut to max_length %d", truncated, split, cfg.max_length)
        datasets[split] = SFTDataset(samples, store)
    if distributed.is_main():
        distributed.barrier()
    torch.manual_seed(cfg.seed)
    projectors = Projectors(projector_config(cfg, cfp_encoder, llm.config))
    model = GrokModel(attach_lora(llm, cfg), projectors, image_id)
    trainer = SFTTrainer(
        model,
        cfg,
        datasets["train"],
        datasets["val"] if len(datasets["val"]) else None,
        out_dir,
        tokenizer.pad_token_id,
        progress=progress,
    )
    result = trainer.fit(resume=resume)
    if not distributed.is_main():
        return None  # rank 0 writes the outputs
    if trainer.sharded:  # one rank cannot export a sharded model: a plain copy takes the last checkpoint's weights
        model, llm = unsharded_copy(cfg, tokenizer, splits["train"], out_dir, llm_dtype, cfp_encoder)
    timings["sft_s"] = result.seconds
    trained = _Trained(model, tokenizer, base_dir, result, grok_config(cfp_encoder, oct_encoder, llm, cfg), splits)
    return _write_outputs(cfg, inputs, out_dir, trained, timings, started)


def unsharded_copy(
    cfg: Stage3Config, tokenizer: Any, train_records: list[dict], out_dir: Path, dtype: torch.dtype, cfp_encoder: Any
) -> tuple[GrokModel, Any]:
    """Rank 0's plain (unsharded) model of a run trained with FSDP, its trained weights (LoRA and projectors)
    from the run's last checkpoint (the trainer writes one at the end of a sharded run); and its LLM."""
    llm, _ = prepare_llm(cfg, tokenizer, train_records, out_dir, dtype, progress=False)
    image_id = ensure_image_token(tokenizer, llm)
    model = GrokModel(attach_lora(llm, cfg), Projectors(projector_config(cfg, cfp_encoder, llm.config)), image_id)
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        raise RuntimeError(f"stage 3: the sharded run in {out_dir} left no checkpoint to export from")
    load_trainable(checkpoint, model, cfg.to_dict())
    log.info("stage 3: exporting the FSDP-trained weights of %s through an unsharded copy", checkpoint)
    return model.eval(), llm


class _Trained(NamedTuple):
    """What a finished SFT run hands to `_write_outputs`."""

    model: GrokModel
    tokenizer: Any
    base_dir: Path  #: the LLM base the LoRA was trained on
    result: TrainResult
    gcfg: GrokConfig
    splits: dict[str, list[dict]]  #: the records of each split


def _write_outputs(
    cfg: Stage3Config,
    inputs: Stage3Inputs,
    out_dir: Path,
    trained: _Trained,
    timings: dict[str, float],
    started: float,
) -> Stage3Result:
    model, tokenizer, base_dir, result, gcfg, splits = trained
    adapter_dir = save_adapter(model.llm, out_dir / ADAPTER_DIR)
    projectors_path = model.projectors.save(out_dir / PROJECTORS_FILE)
    merged = model.llm.merge_and_unload(progressbar=False)  # training is over: merge in place (no copy)
    merged_dir = out_dir / MERGED_DIR
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    save_tokenizer(tokenizer, out_dir / TOKENIZER_DIR)
    save_tokenizer(tokenizer, merged_dir)
    timings["total_s"] = time.monotonic() - started
    report = {
        "config": cfg.to_dict(),
        "config_digest": cfg.digest(),
        "inputs": {k: str(v) for k, v in inputs.__dict__.items()},
        "llm_base": str(base_dir),
        "stand_in": cfg.uses_stand_in,
        "llm_source": llm_source(base_dir),
        "records": {k: len(v) for k, v in splits.items()},
        "steps": result.steps,
        "train_losses": result.train_losses,
        "val_losses": result.val_losses,
        "first_val_loss": result.first_val_loss,
        "last_val_loss": result.last_val_loss,
        "curve_png": str(result.curve_png),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "grok_config": gcfg.to_dict(),
    }
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1))
    log.info(
        "stage 3 done in %.0f s: val loss %s -> %s", timings["total_s"], result.first_val_loss, result.last_val_loss
    )
    return Stage3Result(out_dir, adapter_dir, projectors_path, merged_dir, out_dir / TOKENIZER_DIR, gcfg, report)
