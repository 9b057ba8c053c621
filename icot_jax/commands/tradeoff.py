"""``icot tradeoff``: accuracy against speed of several checkpoints (CSV and PNG)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icot_jax import evaluation
from icot_jax.commands import options
from icot_jax.evaluation import read_eval_examples, write_tradeoff


def run_tradeoff(args: argparse.Namespace) -> int:
    """``icot tradeoff --checkpoints A B C --data FILE``: tradeoff.csv and tradeoff.png under ``--out``."""
    rows = evaluation.tradeoff(args.checkpoints, read_eval_examples(args.data, args.limit), labels=args.labels,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, which=args.which,
                               dtype=args.dtype, join=args.join, position_gap=args.position_gap)
    csv_path, png_path = write_tradeoff(rows, args.out, title=f"{Path(args.data).parent.name}: accuracy vs speed")
    for row in rows:
        print(f"{row['label']:>24}  accuracy {row['accuracy']:.3f}  {row['examples_per_second']:8.2f} examples/s  "
              f"{row['mean_generated_tokens']:6.1f} tokens/example  x{row['speedup_vs_slowest']:.2f}")
    print(json.dumps({"csv": str(csv_path), "png": str(png_path), "rows": rows}))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot tradeoff``."""
    t = subparsers.add_parser("tradeoff", help="accuracy vs speed of several checkpoints (CSV + PNG)")
    t.add_argument("--checkpoints", nargs="+", required=True, help="e.g. checkpoints at growing removal counts")
    t.add_argument("--labels", nargs="+", help="one label per checkpoint (default: folder names)")
    options.checkpoint_options(t, data=True)
    t.add_argument("--out", default="tradeoff", help="output folder (default: ./tradeoff)")
    t.set_defaults(run=run_tradeoff)
