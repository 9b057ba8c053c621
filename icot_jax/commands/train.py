"""``icot train``: train (or resume) a run from a YAML config."""

from __future__ import annotations

import argparse
import json
import signal

from icot_jax.config import DEMO_CONFIG, load_config
from icot_jax.errors import UserError


def run_train(args: argparse.Namespace) -> int:
    """``icot train CONFIG [key=value ...]`` or ``icot train --resume RUN_DIR [key=value ...]``.

    Exit status: 0, or 128 + the signal number when SIGTERM or Ctrl-C stopped the run (it saved a
    checkpoint), 130 when a second Ctrl-C aborted it; a diverged run is an error naming the step to
    resume from.
    """
    from icot_jax.loop.training import TrainingDiverged, train  # jax and orbax: not for `icot --help`

    try:
        if args.resume:
            overrides = [args.config, *args.overrides] if args.config else []
            if any("=" not in item for item in overrides):
                raise UserError("--resume continues a run with its saved config.yaml: give no CONFIG, only "
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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot train``."""
    p = subparsers.add_parser("train", help="train a model with stepwise internalization",
                              description="Train from a YAML config (default: the built-in CPU demo).")
    p.add_argument("config", nargs="?", help="YAML config file (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest checkpoint; key=value overrides may change only "
                        "the LR, warm-up, clipping, epochs, evaluation, checkpointing and logging")
    p.set_defaults(run=run_train)
