"""``icot aot``: compile a config's train step for a TPU slice here and report per-chip memory."""

from __future__ import annotations

import argparse

from icot_jax.aot import compile_train_step
from icot_jax.config import load_config


def run_aot(args: argparse.Namespace) -> int:
    """``icot aot CONFIG [key=value ...] --topology SLICE``."""
    config = load_config(args.config, args.overrides)
    report = compile_train_step(config, args.topology, config_name=args.config)
    print(report.table())
    print(report.to_json())
    return 0 if report.fits else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``icot aot``."""
    p = subparsers.add_parser(
        "aot", help="compile the train step for a TPU slice here and report per-chip memory",
        description="Compile CONFIG's train step (model, batch, accumulation, dtypes, mesh) for a TPU slice "
                    "with libtpu on this host and report per-chip memory, FLOPs and whether it fits. "
                    "Needs jax[tpu]; no TPU and no weights. Exit status 0: fits; 1: does not fit.")
    p.add_argument("config", help="YAML config file, e.g. configs/paper/gsm8k_mistral_7b_icot.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.tensor=2")
    p.add_argument("--topology", required=True, help="TPU slice: v4-16, v5p-8, v5e-16, v6e-8, ...")
    p.set_defaults(run=run_aot)
