"""What stage 3 consumes and leaves behind: its inputs, its output folder's layout and reading a finished run back.

Apart from `run` (the training) so that the steps after it (the bundle packing, the pipeline's bundle step)
read a finished stage 3 without importing the training loop, and so that `run`, `decide` and `bundle` share
these types without importing each other in a circle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grok_pacs.model.config import GrokConfig

REPORT_JSON = "stage3.json"
ADAPTER_DIR, MERGED_DIR, TOKENIZER_DIR, STAND_IN_DIR = "adapter", "llm_merged", "tokenizer", "llm_stand_in"
PROJECTORS_FILE = "projectors.safetensors"


@dataclass(frozen=True)
class Stage3Inputs:
    """What stage 3 consumes from stages 1 and 2."""

    instructions: Path  #: stage-1 JSONL (the paper's record format), one record per eye
    manifest: Path  #: the cohort manifest: images, splits
    cfp_encoder: Path  #: CFP encoder weights (safetensors from stage 2, or a RetiZero .pth)
    oct_encoder: Path  #: OCT encoder weights (the stage-2 aligned RETFound)
    cfp_head: Path  #: CFP biomarker head (safetensors)
    oct_head: Path  #: OCT biomarker head (safetensors)
    image_cache_dir: Path | None = None  #: the preprocessed-image cache shared with stage 2


@dataclass(frozen=True)
class Stage3Result:
    out_dir: Path
    adapter_dir: Path
    projectors_path: Path
    merged_llm_dir: Path
    tokenizer_dir: Path
    grok_config: GrokConfig
    report: dict[str, Any]

    @property
    def curve_png(self) -> Path:
        return Path(self.report["curve_png"])


def load_result(out_dir: Path) -> Stage3Result:
    """The result of a finished stage-3 run, read back from its folder (stage3.json)."""
    out_dir = Path(out_dir)
    report_path = out_dir / REPORT_JSON
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} does not exist: stage 3 has not finished in {out_dir}")
    report = json.loads(report_path.read_text())
    return Stage3Result(
        out_dir,
        out_dir / ADAPTER_DIR,
        out_dir / PROJECTORS_FILE,
        out_dir / MERGED_DIR,
        out_dir / TOKENIZER_DIR,
        GrokConfig.from_dict(report["grok_config"]),
        report,
    )
