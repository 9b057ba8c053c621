"""``icot demo``: the built-in default job, a CPU demo of internalization (``make demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from icot_jax.config import DEMO_CONFIG, load_config


def run_demo(args: argparse.Namespace) -> int:
    """Train the built-in demo and print explicit-CoT accuracy vs final no-CoT accuracy."""
    from icot_jax.loop.logs import read_metrics
    from icot_jax.loop.training import train  # jax and orbax: not for `icot --help`

    summary = train(load_config(DEMO_CONFIG, args.overrides))
    records = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    evals = [r for r in records if "val_accuracy" in r]
    steps = [r for r in records if "loss" in r]

    def last_train_record(step: int) -> dict:
        return [r for r in steps if r["step"] <= step][-1]

    def describe(record: dict) -> str:
        return (f"step {record['step']}: validation accuracy {record['val_accuracy']:.3f}, "
                f"{record['val_mean_generated_tokens']:.1f} tokens generated per answer, "
                f"{record['val_examples_per_s']:.0f} examples/s")

    print(f"\nrun directory: {summary['run_dir']}  (metrics.jsonl, curriculum.png, checkpoints/)")
    explicit = [r for r in evals if last_train_record(r["step"])["scheduled_to_remove"] == 0]
    if explicit:
        print(f"explicit CoT (nothing removed yet), {describe(max(explicit, key=lambda r: r['val_accuracy']))}")
    final = evals[-1]
    left = last_train_record(final["step"])["mean_cot_left"]
    state = "no CoT left" if left == 0 else f"{left:.1f} CoT tokens left per example"
    print(f"final ({state}), {describe(final)}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot demo``."""
    d = subparsers.add_parser("demo", help="CPU demo: a tiny model internalizes multiplication CoT")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides of the demo config")
    d.set_defaults(run=run_demo)
