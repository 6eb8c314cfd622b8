"""Per-epoch metrics of a stage-2 run: `metrics.jsonl` (one JSON object per epoch) and `curve.png`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend chosen first: no display on servers)

METRICS_NAME, CURVE_NAME = "metrics.jsonl", "curve.png"


class MetricsLog:
    """Appends epoch records; on resume, drops records past the checkpoint's epoch (they will be redone)."""

    def __init__(self, out_dir: Path, keep_epochs: int) -> None:
        self.path = out_dir / METRICS_NAME
        self.curve_path = out_dir / CURVE_NAME
        self.records = [r for r in self._read() if r.get("epoch", 0) <= keep_epochs]
        self._rewrite()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _rewrite(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def plot(self) -> Path | None:
        """Training and validation loss, and the validation probe MAE (standardised), against epoch."""
        if not self.records:
            return None
        epochs = [r["epoch"] for r in self.records]
        fig, (ax_loss, ax_mae) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in self.records], label="train")
        val = [(r["epoch"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        if val:
            ax_loss.plot(*zip(*val), label="validation")
        ax_loss.set(xlabel="epoch", ylabel="contrastive loss", title="loss")
        ax_loss.legend()
        mae = [(r["epoch"], r["val_probe_mae_std"]) for r in self.records if r.get("val_probe_mae_std") is not None]
        if mae:
            ax_mae.plot(*zip(*mae), marker="o")
        ax_mae.set(xlabel="epoch", ylabel="MAE / training SD", title="validation ridge-probe MAE")
        fig.tight_layout()
        fig.savefig(self.curve_path, dpi=100)
        plt.close(fig)
        return self.curve_path
