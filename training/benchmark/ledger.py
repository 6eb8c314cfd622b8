"""The ledger of reported test cohorts: a benchmark on a cohort already reported is a re-run, and says so.

Every figure measured on a test split that was looked at before, with fixes in between, is no longer a
held-out figure. `bench/results/ledger.json` lists each cohort (phantom seed and size, or a manifest's
sha256) whose test split a benchmark has reported, with when, the commit and the headline. `record`
adds a run and returns whether the cohort was already there (the caller marks its output a re-run);
`is_reported` asks before running. A new headline needs a cohort that is not in it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LEDGER_FORMAT = "grok-pacs-test-ledger/1"


def cohort_key(seed: int | None = None, n_subjects: int | None = None, manifest_sha256: str = "") -> str:
    """The ledger's name for a test cohort: "phantom seed S (N subjects)" or "manifest <sha256>"."""
    if manifest_sha256:
        return f"manifest {manifest_sha256}"
    if seed is None or n_subjects is None:
        raise ValueError("a phantom cohort is named by its seed and its size")
    return f"phantom seed {int(seed)} ({int(n_subjects)} subjects)"


def load(path: Path) -> dict[str, Any]:
    """The ledger (an empty one when the file does not exist); ValueError for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        return {"format": LEDGER_FORMAT, "runs": []}
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != LEDGER_FORMAT or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a test ledger ({LEDGER_FORMAT})")
    return data


def is_reported(path: Path, key: str) -> bool:
    """Whether a benchmark has already reported the test split of cohort `key`."""
    return any(run["cohort"] == key for run in load(path)["runs"])


def record(path: Path, key: str, *, what: str, commit: str = "", headline: dict | None = None) -> bool:
    """Add a reported run of cohort `key` to the ledger; True when the cohort was reported before (a re-run)."""
    data = load(path)
    rerun = any(run["cohort"] == key for run in data["runs"])
    data["runs"].append(
        {
            "cohort": key,
            "what": what,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit,
            "rerun": rerun,
            "headline": headline or {},
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return rerun
