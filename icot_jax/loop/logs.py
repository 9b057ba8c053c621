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


def count_spans(records: list[dict]) -> list[tuple[int, int, str | None]]:
    """``(scheduled count, steps trained at it, why it advanced)`` for each count the schedule left while
    CoT was still left, in order.

    Exact for an adaptive run (its ``schedule_advance`` records; the first count's steps start after
    pretraining); for a fixed run, read from the training records at their logging resolution, from the
    first logged step, with no reason (``None``).
    """
    advances = [r for r in records if "schedule_advance" in r]
    if advances:
        return [(r["scheduled_from"], r["steps_at_count"], r["schedule_advance"]) for r in advances]
    train = [r for r in records if "loss" in r]
    spans, since = [], train[0]["step"] if train else 0
    for before, after in zip(train, train[1:]):
        if after["scheduled_to_remove"] > before["scheduled_to_remove"] and before["mean_cot_left"] > 0:
            spans.append((before["scheduled_to_remove"], after["step"] - since, None))
            since = after["step"]
    return spans


def plot_run(metrics_path: Path | str, out_png: Path | str, title: str = "") -> Path:
    """Plot the curriculum of a run: scheduled removal (left axis) and accuracies (right axis) vs step, and
    below, the steps spent at each scheduled count (:func:`count_spans`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_accuracy" in r]
    fig, (ax, spans_ax) = plt.subplots(2, 1, figsize=(8, 6.5), gridspec_kw={"height_ratios": [3, 1.3]})
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
    _plot_spans(spans_ax, count_spans(records))
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def _plot_spans(ax, spans: list[tuple[int, int, str | None]]) -> None:
    """Bars: steps trained at each scheduled count, coloured by why the count advanced."""
    colours = {"recovered": "tab:green", "max_steps": "tab:orange", None: "tab:gray"}
    for reason, colour in colours.items():
        chosen = [(count, steps) for count, steps, why in spans if why == reason]
        if chosen:
            ax.bar([c for c, _ in chosen], [n for _, n in chosen], color=colour, width=0.8,
                   label=f"advanced: {reason}" if reason else "steps at the count (logging resolution)")
    ax.set_xlabel("CoT tokens scheduled to remove")
    ax.set_ylabel("steps at this count")
    if spans:
        ax.legend(fontsize=8)
