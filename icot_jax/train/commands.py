"""Command-line entry points of training: ``icot train``, ``icot demo``, ``icot export-hf``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icot_jax.cli import user_errors_exit

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "demo.yaml"
"""The built-in default job: a CPU demo of internalization (``make demo``)."""


@user_errors_exit
def run_train(args: argparse.Namespace) -> int:
    """``icot train CONFIG [key=value ...]`` or ``icot train --resume RUN_DIR [key=value ...]``.

    Exit status: 0, or 128 + the signal number when SIGTERM or Ctrl-C stopped the run (it saved a
    checkpoint), 130 when a second Ctrl-C aborted it; a diverged run is an error naming the step to
    resume from.
    """
    import signal

    from icot_jax.config import load_config
    from icot_jax.train.loop import TrainingDiverged, train

    try:
        if args.resume:
            overrides = [args.config, *args.overrides] if args.config else []
            if any("=" not in item for item in overrides):
                raise ValueError("--resume continues a run with its saved config.yaml: give no CONFIG, only "
                                 "key=value overrides of the keys a resumed run may change (e.g. train.lr=1e-4)")
            summary = train(None, resume_dir=args.resume, overrides=overrides)
        else:
            summary = train(load_config(args.config or DEMO_CONFIG, args.overrides))
    except TrainingDiverged as error:
        raise SystemExit(f"icot train: error: {error}") from None
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary))
    return 128 + signal.Signals[summary["signal"]].value if summary["interrupted"] else 0


@user_errors_exit
def run_demo(args: argparse.Namespace) -> int:
    """Train the built-in demo and print explicit-CoT accuracy vs final no-CoT accuracy."""
    from icot_jax.config import load_config
    from icot_jax.train.logs import read_metrics
    from icot_jax.train.loop import train

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


@user_errors_exit
def run_export(args: argparse.Namespace) -> int:
    """``icot export-hf RUN_DIR OUT_DIR``: the run's best (or latest) weights as an HF folder, with an
    ``icot_jax.json`` recording the run's join mode and position handling for ``icot eval`` (both local or
    ``gs://``)."""
    from icot_jax.runs import export_hf, open_run

    run = open_run(args.run_dir, which=args.which)
    export_hf(run, args.out)
    print(f"exported the {run.which} weights (step {run.step}) of {args.run_dir} to {args.out}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``, ``demo`` and ``export-hf``."""
    p = subparsers.add_parser("train", help="train a model with stepwise internalization",
                              description="Train from a YAML config (default: the built-in CPU demo).")
    p.add_argument("config", nargs="?", help="YAML config file (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest checkpoint; key=value overrides may change only "
                        "the LR, warm-up, clipping, epochs, evaluation, checkpointing and logging")
    p.set_defaults(run=run_train)
    d = subparsers.add_parser("demo", help="CPU demo: a tiny model internalizes multiplication CoT")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides of the demo config")
    d.set_defaults(run=run_demo)
    e = subparsers.add_parser("export-hf", help="export a run's weights as a Hugging Face folder")
    e.add_argument("run_dir", help="training run directory (local or gs://)")
    e.add_argument("out", help="folder to write (local or gs://)")
    e.add_argument("--which", choices=("best", "latest"), default="best")
    e.set_defaults(run=run_export)
