"""Do two training runs log the same metrics? (How a refactor proves it changed no behaviour.)

    python bench/compare_metrics.py runs/before runs/after
    python bench/compare_metrics.py runs/adaptive119 runs/decay --ignore lr_scale   # where does the decay start?

Compares the ``metrics.jsonl`` of two run directories record by record over the steps both reached,
ignoring the fields that measure time (``elapsed_s`` and every ``*_examples_per_s``). A run stopped
earlier (or trained for fewer epochs with the same ``train.length_buckets``) is compared on its steps; its
final evaluation, which the loop always runs after the last batch, is compared only if the other run
also evaluated at that step. ``--ignore FIELD`` (repeatable) leaves a field out too, e.g. ``lr_scale``,
which only runs with ``train.lr_decay`` log. Exit status 0 when identical, 1 with the first difference
otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icot_jax.loop.logs import read_metrics

TIMING = ("elapsed_s",)


def comparable(record: dict, ignore: tuple[str, ...] = ()) -> dict:
    """``record`` without its timing fields and the ``ignore``d ones."""
    return {k: v for k, v in record.items()
            if k not in TIMING and k not in ignore and not k.endswith("_examples_per_s")}


def key(record: dict) -> tuple[int, bool]:
    """A record's identity: its step, and whether it is a training line (an evaluation otherwise)."""
    return record["step"], "loss" in record


def common_records(a: list[dict], b: list[dict], ignore: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """The records of both runs that the other also has, up to the last step both reached (without the
    fields :func:`comparable` drops)."""
    last = min(a[-1]["step"], b[-1]["step"])

    def pick(records: list[dict], other: list[dict]) -> list[dict]:
        keys = {key(r) for r in other}
        return [comparable(r, ignore) for r in records if r["step"] <= last and key(r) in keys]

    return pick(a, b), pick(b, a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--ignore", action="append", default=[], metavar="FIELD", help="also leave this field out")
    args = parser.parse_args()
    a, b = (read_metrics(run / "metrics.jsonl") for run in (args.before, args.after))
    a, b = common_records(a, b, tuple(args.ignore))
    for x, y in zip(a, b):
        if x != y:
            changed = {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
            print(f"step {x['step']}: {changed}")
            return 1
    ignored = "".join(f", {field}" for field in args.ignore)
    print(f"identical apart from timing fields{ignored}: {len(a)} records, steps {a[0]['step']}..{a[-1]['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
