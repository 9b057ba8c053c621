"""``icot export-hf``: a run's weights as a Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_export(args: argparse.Namespace) -> int:
    """``icot export-hf RUN_DIR OUT_DIR``: the run's best (or latest) weights as an HF folder, with an
    ``icot_jax.json`` recording the run's join mode and position handling for ``icot eval``."""
    from icot_jax.evaluation import write_export_info
    from icot_jax.models import hf
    from icot_jax.runs import load_run_model

    model, tokenizer, config = load_run_model(args.run_dir, which=args.which)
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(str(Path(args.run_dir) / "model"))
    hf.export_pretrained(model, hf_config, args.out, tokenizer=tokenizer)
    write_export_info(args.out, config, source=Path(args.run_dir).resolve())
    print(f"exported {args.which} weights of {args.run_dir} to {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot export-hf``."""
    e = subparsers.add_parser("export-hf", help="export a run's weights as a Hugging Face folder")
    e.add_argument("run_dir")
    e.add_argument("out")
    e.add_argument("--which", choices=("best", "latest"), default="best")
    e.set_defaults(run=run_export)
