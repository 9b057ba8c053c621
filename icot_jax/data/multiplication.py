"""K-by-K multiplication data in the exact line format of the reference.

`format_example(a, b)` reproduces every line of the reference valid/test files byte for byte.
`generate_splits` draws distinct operand pairs (train/valid/test disjoint, optionally disjoint from
pairs in existing files) from a seeded `numpy.random.Generator`; `write_dataset` writes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from icot_jax.data.formats import DataFormatError, Example, parse_line, read_examples
from icot_jax.errors import UserError

Pair = tuple[int, int]
SPLITS = ("train", "valid", "test")
REFERENCE_SIZES = {"train": 808_000, "valid": 1_000, "test": 1_000}
MIN_DIGITS, MAX_DIGITS = 2, 20
_CHUNK_DIGITS = 9  # int64 holds any 9-digit chunk, so numbers up to 20 digits are drawn in chunks
_PROGRESS_MIN_LINES = 50_000


def _reversed_digits(n: int, width: int) -> str:
    """`n` zero-padded to `width` digits, least significant digit first, space-separated."""
    return " ".join(reversed(str(n).zfill(width)))


def format_example(a: int, b: int) -> str:
    """The reference line `a_rev * b_rev||COT #### ANS` for the product `a * b`.

    With b_i the i-th digit of `b` (least significant first), the partial product
    pp_i = a * b_i * 10^i is written reversed and padded to len(a)+1+i digits; after each pp_i with
    0 < i < len(b)-1 comes the running sum ( r_i ), padded the same way. The answer is padded to
    len(a)+len(b) digits.
    """
    if not (isinstance(a, int) and isinstance(b, int)) or a < 1 or b < 1:
        raise UserError(f"operands must be positive integers, got {a!r} and {b!r}")
    ka, kb = len(str(a)), len(str(b))
    steps, running = [], 0
    for i, digit in enumerate(reversed(str(b))):
        partial = a * int(digit) * 10**i
        running += partial
        width = ka + 1 + i
        if i == 0:
            steps.append(_reversed_digits(partial, width))
            continue
        steps.append(f"+ {_reversed_digits(partial, width)}")
        if i < kb - 1:
            steps.append(f"( {_reversed_digits(running, width)} )")
    question = f"{_reversed_digits(a, ka)} * {_reversed_digits(b, kb)}"
    return f"{question}||{' '.join(steps)} #### {_reversed_digits(a * b, ka + kb)}"


def make_example(a: int, b: int) -> Example:
    """The `Example` of the product `a * b` (the parsed `format_example(a, b)` line)."""
    return parse_line(format_example(a, b))


def parse_operands(source: str) -> Pair:
    """The operands `(a, b)` of a multiplication source `'a_rev * b_rev'`."""
    sides = source.split(" * ")
    digits = [side.split() for side in sides]
    if len(sides) != 2 or not all(d and all(c.isdigit() and len(c) == 1 for c in d) for d in digits):
        raise DataFormatError(f"not a multiplication source 'd d * d d': {source!r}")
    a, b = (int("".join(reversed(d))) for d in digits)
    return a, b


def read_pairs(paths: Iterable[str | Path]) -> set[Pair]:
    """Operand pairs of the multiplication files at `paths` (e.g. to keep new data disjoint)."""
    pairs: set[Pair] = set()
    for path in paths:
        for number, example in enumerate(read_examples(path).examples, start=1):
            try:
                pairs.add(parse_operands(example.source))
            except DataFormatError as e:
                raise DataFormatError(f"{path}: example {number}: {e}") from None
    return pairs


def count_pairs(digits: int) -> int:
    """Number of distinct (a, b) pairs of `digits`-digit operands."""
    return (9 * 10 ** (digits - 1)) ** 2


def _uniform_operands(rng: np.random.Generator, digits: int, n: int) -> list[int]:
    """`n` uniform `digits`-digit integers (leading digit 1-9), drawn 9 digits at a time."""
    top = digits - _CHUNK_DIGITS * ((digits - 1) // _CHUNK_DIGITS)
    values = rng.integers(10 ** (top - 1), 10**top, size=n).astype(object)
    for _ in range((digits - 1) // _CHUNK_DIGITS):
        values = values * 10**_CHUNK_DIGITS + rng.integers(0, 10**_CHUNK_DIGITS, size=n).astype(object)
    return values.tolist()


def sample_pairs(rng: np.random.Generator, digits: int, n: int, exclude: AbstractSet[Pair] = frozenset()) -> list[Pair]:
    """`n` distinct uniform pairs of `digits`-digit operands, none of them in `exclude`."""
    if not MIN_DIGITS <= digits <= MAX_DIGITS:
        raise UserError(f"digits must be in [{MIN_DIGITS}, {MAX_DIGITS}], got {digits}")
    low = 10 ** (digits - 1)
    excluded = {(a, b) for a, b in exclude if low <= a < 10 * low and low <= b < 10 * low}
    available = count_pairs(digits) - len(excluded)
    if n > available:
        raise UserError(
            f"cannot draw {n} distinct {digits}x{digits} pairs: only {available} exist"
            + (f" after excluding {len(excluded)}" if excluded else "")
        )
    total, span = count_pairs(digits), 9 * low
    if total <= 4 * (n + len(excluded)):
        # Dense request: rejection sampling would stall near the end, so draw indices without
        # replacement; the few excluded ones are dropped afterwards.
        flat = rng.choice(total, size=n + len(excluded), replace=False).tolist()
        pairs = ((low + i // span, low + i % span) for i in flat)
        return [p for p in pairs if p not in excluded][:n]
    # Sparse request: a fresh draw collides with probability below 1/4, so few rounds are needed.
    seen, out = set(excluded), []
    while len(out) < n:
        draw = n - len(out) + 16
        for pair in zip(_uniform_operands(rng, digits, draw), _uniform_operands(rng, digits, draw)):
            if pair not in seen and len(out) < n:
                seen.add(pair)
                out.append(pair)
    return out


def _split_evenly(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def generate_splits(
    digits: Sequence[int], sizes: Mapping[str, int], *, seed: int, exclude: AbstractSet[Pair] = frozenset()
) -> dict[str, list[Pair]]:
    """Distinct operand pairs per split, disjoint across splits and from `exclude`.

    With several K the size of each split is divided evenly among them and the split is shuffled.
    Each K draws from its own generator `default_rng([seed, K])`, so adding a K to a mixture
    leaves the pairs drawn for the others unchanged.
    """
    digits = sorted(set(digits))
    if not digits:
        raise UserError("digits must name at least one K")
    shares = {split: _split_evenly(sizes.get(split, 0), len(digits)) for split in SPLITS}
    splits: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    for j, k in enumerate(digits):
        pairs = sample_pairs(np.random.default_rng([seed, k]), k, sum(s[j] for s in shares.values()), exclude)
        start = 0
        for split in SPLITS:
            splits[split] += pairs[start : start + shares[split][j]]
            start += shares[split][j]
    rng = np.random.default_rng(seed)
    return {split: [pairs[i] for i in rng.permutation(len(pairs))] for split, pairs in splits.items()}


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    """What `write_dataset` wrote for one split."""

    path: Path
    n_lines: int
    cot_lengths: dict[int, int]  # K -> CoT length in whitespace tokens (fixed for a given K)


def cot_length(digits: int) -> int:
    """CoT length of a K-by-K example in whitespace tokens (46 for K = 4)."""
    low = 10 ** (digits - 1)
    return len(make_example(low, low).cot.split())


def write_dataset(
    out_dir: str | Path,
    digits: Sequence[int],
    sizes: Mapping[str, int] = REFERENCE_SIZES,
    *,
    seed: int = 0,
    exclude_files: Sequence[str | Path] = (),
) -> dict[str, SplitSummary]:
    """Writes `train.txt`, `valid.txt`, `test.txt` under `out_dir` (splits of size 0 are skipped)."""
    out_dir = Path(out_dir)
    splits = generate_splits(digits, sizes, seed=seed, exclude=read_pairs(exclude_files))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, pairs in splits.items():
        if not pairs:
            continue
        path = out_dir / f"{split}.txt"
        progress = tqdm(pairs, desc=f"writing {path}", unit=" lines", disable=len(pairs) < _PROGRESS_MIN_LINES)
        with path.open("w", encoding="utf-8") as f:
            f.writelines(format_example(a, b) + "\n" for a, b in progress)
        ks = sorted({len(str(a)) for a, _ in pairs})
        summary[split] = SplitSummary(path, len(pairs), {k: cot_length(k) for k in ks})
    return summary
