"""``icot export-hf``: a run's weights as a Hugging Face folder."""

from __future__ import annotations

import argparse


def run_export(args: argparse.Namespace) -> int:
    """``icot export-hf RUN_DIR OUT_DIR``: the run's best (or latest) weights as an HF folder, with an
    ``icot_jax.json`` recording the run's join mode and position handling for ``icot eval`` (both local or
    ``gs://``)."""
    from icot_jax.runs import export_hf, open_run

    run = open_run(args.run_dir, which=args.which)
    export_hf(run, args.out)
    print(f"exported the {run.which} weights (step {run.step}) of {args.run_dir} to {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot export-hf``."""
    e = subparsers.add_parser("export-hf", help="export a run's weights as a Hugging Face folder")
    e.add_argument("run_dir", help="training run directory (local or gs://)")
    e.add_argument("out", help="folder to write (local or gs://)")
    e.add_argument("--which", choices=("best", "latest"), default="best",
                   help="the best evaluation's weights, or the newest (default: best; latest when it has no best yet)")
    e.set_defaults(run=run_export)
