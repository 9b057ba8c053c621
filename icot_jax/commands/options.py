"""Options shared by ``icot eval``, ``generate`` and ``tradeoff``, and how they open a checkpoint."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, get_args

from icot_jax.config import DType, JoinMode
from icot_jax.evaluation import DEFAULT_MAX_NEW_TOKENS

if TYPE_CHECKING:
    from icot_jax.runs import OpenedRun


def load(args: argparse.Namespace, url: str) -> OpenedRun:
    """The checkpoint at ``url`` (local or ``gs://``) as the command's ``--which``, ``--dtype`` and ``--join``
    ask."""
    from icot_jax.runs import open_run  # orbax and jax: not for `icot --help`

    return open_run(url, which=args.which, dtype=args.dtype, join=args.join)


def parse_n_remove(text: str) -> int:
    """``K`` (CoT tokens removed from the left of every example) or ``all`` (``REMOVE_ALL``)."""
    from icot_jax.removal import REMOVE_ALL  # jax: not for `icot --help`

    if text == "all":
        return REMOVE_ALL
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of CoT tokens or 'all', got {text!r}")
    return int(text)


def parse_position_gap(text: str) -> str | int:
    """``auto`` or a non-negative number of positions."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of positions, got {text!r}")
    return int(text)


def checkpoint_options(parser: argparse.ArgumentParser, *, data: bool) -> None:
    """Options shared by ``eval``, ``tradeoff`` (``data``: they read a data file) and ``generate``."""
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="weights of a run directory (default: best; latest when it has no best yet)")
    parser.add_argument("--dtype", choices=get_args(DType),
                        help="dtype of the weights and compute (default: a run's model.dtype and model.param_dtype, "
                             "float32 for a Hugging Face folder)")
    parser.add_argument("--join", choices=get_args(JoinMode),
                        help="tokenization mode of training (default: the run's, or 'reference')")
    if data:
        parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                            help=f"default: {DEFAULT_MAX_NEW_TOKENS}, as the reference")
    else:
        parser.add_argument("--max-new-tokens", type=int,
                            help=f"default: a run's eval.max_new_tokens ({DEFAULT_MAX_NEW_TOKENS} for a Hugging Face "
                                 "folder); capped by a learned position table")
    parser.add_argument("--position-gap", type=parse_position_gap, default="auto", metavar="auto|N",
                        help="positions skipped after the prompt; auto: 0, or for a train.keep_position run the "
                             "CoT length it was trained without (default: auto)")
    if data:
        parser.add_argument("--data", required=True, help="SRC||COT #### ANS file (e.g. valid.txt)")
        parser.add_argument("--batch-size", type=int, help="prompts decoded together (default: the fewest even "
                                                           "batches of at most 128)")
        parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
