"""``icot eval``: greedy-decode a data file with a checkpoint and score it as the reference does."""

from __future__ import annotations

import argparse
import dataclasses
import json

from icot_jax.commands import options
from icot_jax.evaluation import evaluate_checkpoint, read_eval_examples


def run_eval(args: argparse.Namespace) -> int:
    """``icot eval --checkpoint DIR --data FILE``: writes eval.json (+ predictions) and prints it last."""
    from etils import epath  # a gs:// checkpoint gets its eval.json in the bucket, beside the run's files

    checkpoint = options.load(args, args.checkpoint)
    examples = read_eval_examples(args.data, args.limit)
    result, metrics = evaluate_checkpoint(checkpoint, examples, batch_size=args.batch_size,
                                          max_new_tokens=args.max_new_tokens, n_remove=args.n_remove,
                                          position_gap=args.position_gap)
    out = epath.Path(args.out or f"{args.checkpoint.rstrip('/')}/eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"data": str(args.data), **metrics}
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    predictions = "".join(json.dumps(dataclasses.asdict(prediction)) + "\n" for prediction in result.predictions)
    out.with_name(f"{out.stem}_predictions.jsonl").write_text(predictions)
    print(json.dumps(metrics))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot eval``."""
    e = subparsers.add_parser("eval", help="generation accuracy and throughput of a checkpoint",
                              description="Greedy-decode every question of --data and score the answers "
                                          "exactly as the reference; writes eval.json.")
    e.add_argument("--checkpoint", required=True, help="training run directory or Hugging Face folder (local or gs://)")
    options.checkpoint_options(e, data=True)
    e.add_argument("--out", help="where to write the JSON (default: CHECKPOINT/eval.json)")
    e.add_argument("--n-remove", type=options.parse_n_remove, metavar="K|all",
                   help="also report teacher-forced loss/accuracy with K CoT tokens removed")
    e.set_defaults(run=run_eval)
