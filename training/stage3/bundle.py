"""From a finished stage 3 to the servable bundle: the model's GrokConfig and the packing (export.build_bundle).

`grok_config` and `projector_config` describe the trained parts (`run` builds its projectors from the same
configuration it records), `llm_source` names the LLM base for the provenance and `pack_bundle` hands the
parts to `export`. Apart from `run` because packing is a step of its own (the pipeline's bundle step) that
reads a finished run back (training.stage3.result) and never trains.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grok_pacs.model.config import GenerationConfig, GrokConfig, LLMConfig, ProjectorConfig
from grok_pacs.model.decision import DECISION_FILE
from grok_pacs.model.heads import BiomarkerHead
from grok_pacs.model.pattern import PATTERN_HEAD_FILE
from training.stage3.config import Stage3Config
from training.stage3.pretrain_llm import STAND_IN_FILE
from training.stage3.result import Stage3Inputs, Stage3Result


def grok_config(cfp_encoder: Any, oct_encoder: Any, llm: Any, cfg: Stage3Config) -> GrokConfig:
    """The bundle's GrokConfig: encoder shapes, projector widths and the LLM's own dimensions."""
    c = llm.config
    llm_cfg = LLMConfig(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=_rope_theta(c),
    )
    generation = GenerationConfig(
        max_new_tokens=768 if cfg.uses_stand_in else cfg.max_new_tokens,
        biomarkers_in_prompt=cfg.biomarker_estimates,
        compact_biomarkers=cfg.compact_biomarkers,
        pattern_subtype=cfg.pattern_subtype,
    )
    return GrokConfig(
        cfp_encoder=cfp_encoder.cfg,
        oct_encoder=oct_encoder.cfg,
        projector=projector_config(cfg, cfp_encoder, c),
        llm=llm_cfg,
        generation=generation,
        max_length=cfg.max_length,
    )


def projector_config(cfg: Stage3Config, cfp_encoder: Any, llm_config: Any) -> ProjectorConfig:
    return ProjectorConfig(
        vision_dim=cfp_encoder.cfg.embed_dim, llm_hidden_size=llm_config.hidden_size, token_grid=cfg.token_grid
    )


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10_000.0)))


def pack_bundle(
    result: Stage3Result,
    inputs: Stage3Inputs,
    bundle_dir: Path,
    *,
    name: str,
    version: str,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """The servable bundle (export.build_bundle): ONNX encoders, heads, projectors, merged LLM, tokenizer."""
    from export.build_bundle import BundleOptions, ModelParts, build_bundle

    report = result.report
    prov = {
        "stage3": {
            "config": report["config"],
            "config_digest": report["config_digest"],
            "stand_in_llm": report["stand_in"],
            "llm_base": report["llm_base"],
            "llm_source": report.get("llm_source"),
            "val_loss": [report["first_val_loss"], report["last_val_loss"]],
            "steps": report["steps"],
            "records": report["records"],
        },
        "inputs": report["inputs"],
        **(provenance or {}),
    }
    heads = [BiomarkerHead.load(inputs.cfp_head), BiomarkerHead.load(inputs.oct_head)]
    pattern = result.out_dir / PATTERN_HEAD_FILE
    decision = result.out_dir / DECISION_FILE
    parts = ModelParts(
        config=result.grok_config,
        cfp_encoder=inputs.cfp_encoder,
        oct_encoder=inputs.oct_encoder,
        heads=heads,
        projectors=result.projectors_path,
        tokenizer_dir=result.tokenizer_dir,
        llm_dir=result.merged_llm_dir,
        pattern_head=pattern if pattern.is_file() else None,
        decision=decision if decision.is_file() else None,
    )
    options = BundleOptions(overwrite=True, progress=progress)
    return build_bundle(bundle_dir, parts, name=name, version=version, provenance=prov, options=options)


def llm_source(base_dir: Path) -> dict[str, Any] | None:
    """What the LLM base is, from its `stand_in.json` (the tiny stand-in's or the SmolLM2 conversion's)."""
    note = Path(base_dir) / STAND_IN_FILE
    return json.loads(note.read_text()) if note.is_file() else None
