"""``icot generate``: one question answered by a checkpoint (its CoT, if any, and answer)."""

from __future__ import annotations

import argparse

from icot_jax.commands import options
from icot_jax.evaluation import format_answer, generate_answer


def run_generate(args: argparse.Namespace) -> int:
    """``icot generate --checkpoint DIR QUESTION``: the model's CoT (if any) and answer."""
    answer = generate_answer(options.load(args, args.checkpoint), args.question, max_new_tokens=args.max_new_tokens,
                             position_gap=args.position_gap)
    print(format_answer(answer))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot generate``."""
    g = subparsers.add_parser("generate", help="answer one question",
                              description="Multiplication in normal notation (3719*3349) is converted to the "
                                          "models' reversed notation and the answer back; other text is used as is.")
    g.add_argument("question", help="e.g. '3719*3349', '9 1 7 3 * 9 4 3 3' or a GSM8K question")
    g.add_argument("--checkpoint", required=True, help="training run directory or Hugging Face folder (local or gs://)")
    options.checkpoint_options(g, data=False)
    g.set_defaults(run=run_generate)
