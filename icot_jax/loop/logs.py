"""What a run writes besides checkpoints: ``metrics.jsonl``, TensorBoard events and the final plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


class MetricsLog:
    """Append-only metrics: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars.

    On resume, lines logged after the checkpoint's step by the interrupted run are dropped first, so
    the file reads as one uninterrupted run; TensorBoard's events are then rewritten from the kept lines
    (a killed run loses whatever its event writer had not flushed, and holds points after the
    checkpoint that the resumed run logs again), so they too hold every logged point exactly once.
    Each record is flushed as it is written. Only the writing process (process 0) should create one.
    """

    def __init__(self, run_dir: Path | str, *, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        tensorboard = Path(run_dir) / "tensorboard"
        kept = []
        if resume_step is not None:
            if self.path.exists():
                kept = [record for record in read_metrics(self.path) if record["step"] <= resume_step]
                self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
            shutil.rmtree(tensorboard, ignore_errors=True)
        self._file = self.path.open("a")
        self._tb = SummaryWriter(str(tensorboard))
        for record in kept:
            self._add_scalars(record)
        self._tb.flush()

    def _add_scalars(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, record["step"])

    def write(self, record: dict) -> None:
        """Log one record; it must have an integer ``step``. Numbers also go to TensorBoard."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._add_scalars(record)
        self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs."""
        self._file.close()
        self._tb.close()


def read_metrics(path: Path | str) -> list[dict]:
    """All records of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: Path | str, out_png: Path | str, title: str = "") -> Path:
    """Plot the curriculum of a run: scheduled removal (left axis) and accuracies (right axis) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # scheduled_to_remove is logged as the longest training CoT once everything is removed.
    ax.step([r["step"] for r in train], [r["scheduled_to_remove"] for r in train], where="post",
            color="tab:gray", label="CoT tokens scheduled to remove")
    ax.set_xlabel("step")
    ax.set_ylabel("CoT tokens scheduled to remove")
    acc = ax.twinx()
    acc.plot([r["step"] for r in train], [r["token_accuracy"] for r in train], color="tab:blue", alpha=0.4,
             label="train token accuracy")
    if evals:
        acc.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", color="tab:red",
                 label="validation exact match")
    acc.set_ylim(-0.02, 1.02)
    acc.set_ylabel("accuracy")
    handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
