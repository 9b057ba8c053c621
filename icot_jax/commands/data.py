"""``icot data multiplication|gsm8k|tokenizer|tfds``: generate, convert and package datasets."""

from __future__ import annotations

import argparse
from pathlib import Path


def _digit_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or comma-separated K values like 4,5, got {text!r}") from None


def _split_file(text: str) -> tuple[str, str]:
    split, sep, path = text.partition("=")
    if not sep or not split or not path:
        raise argparse.ArgumentTypeError(f"expected SPLIT=PATH, got {text!r}")
    return split, path


def _run_multiplication(args: argparse.Namespace) -> None:
    from icot_jax.data import multiplication

    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    summary = multiplication.write_dataset(args.out, args.digits, sizes, seed=args.seed, exclude_files=args.exclude)
    for split in summary.values():
        print(f"wrote {split.path}: {split.n_lines} lines")
    lengths = {k: n for split in summary.values() for k, n in split.cot_lengths.items()}
    print("CoT length in whitespace tokens: " + ", ".join(f"{k}x{k}: {n}" for k, n in sorted(lengths.items())))


def _run_gsm8k(args: argparse.Namespace) -> None:
    from icot_jax.data import formats

    parsed = formats.convert_gsm8k_jsonl(args.jsonl, style=args.style, on_error=args.on_error)
    count = formats.write_examples(args.out, parsed.examples)
    print(f"wrote {args.out}: {count} lines ({parsed.n_skipped} malformed records skipped)")


def _run_tokenizer(args: argparse.Namespace) -> None:
    from icot_jax.data import tokenize

    print(f"saved the built-in tokenizer to {tokenize.save_builtin_tokenizer(args.out)}")


def _run_tfds(args: argparse.Namespace) -> None:
    from icot_jax.data import tfds_builders

    config = tfds_builders.TextFilesConfig(name=args.name, split_files=dict(args.split), on_error=args.on_error)
    builder = tfds_builders.build(tfds_builders.IcotText, config, args.data_dir)
    print(f"prepared icot_text/{args.name} in {builder.data_dir}: {dict(builder.info.splits)}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """`icot data multiplication|gsm8k|tokenizer|tfds`."""
    data = subparsers.add_parser("data", help="generate, convert and package datasets")
    commands = data.add_subparsers(dest="data_command", required=True)

    mult = commands.add_parser("multiplication", help="generate K-by-K multiplication in the reference format")
    mult.add_argument("--digits", type=_digit_list, required=True, help="K, or a mixture such as 4,5")
    mult.add_argument("--train", type=int, default=808_000, help="train examples (default: 808000)")
    mult.add_argument("--valid", type=int, default=1_000, help="valid examples (default: 1000)")
    mult.add_argument("--test", type=int, default=1_000, help="test examples (default: 1000)")
    mult.add_argument("--seed", type=int, default=0)
    mult.add_argument("--out", type=Path, required=True, help="folder for train.txt, valid.txt, test.txt")
    mult.add_argument(
        "--exclude", type=Path, nargs="+", default=[], help="multiplication files whose pairs must not be drawn"
    )
    mult.set_defaults(run=_run_multiplication)

    gsm8k = commands.add_parser("gsm8k", help="convert original GSM8K jsonl to SRC||COT #### ANS lines")
    gsm8k.add_argument("jsonl", type=Path, help='GSM8K file with {"question", "answer"} records')
    gsm8k.add_argument("--out", type=Path, required=True)
    gsm8k.add_argument(
        "--style", choices=("formula", "text"), default="formula", help="calculator formulas (GSM8K-Aug) or prose"
    )
    gsm8k.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    gsm8k.set_defaults(run=_run_gsm8k)

    tokenizer = commands.add_parser("tokenizer", help="save the built-in digit tokenizer in HF format")
    tokenizer.add_argument("--out", type=Path, required=True)
    tokenizer.set_defaults(run=_run_tokenizer)

    tfds = commands.add_parser("tfds", help="package SRC||COT #### ANS files as an array_record tfds dataset")
    tfds.add_argument("--name", required=True, help="config name, read back as icot_text/NAME")
    tfds.add_argument(
        "--split", type=_split_file, action="append", required=True, help="SPLIT=PATH, once per split"
    )
    tfds.add_argument("--data-dir", type=Path, required=True)
    tfds.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    tfds.set_defaults(run=_run_tfds)
