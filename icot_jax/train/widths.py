"""Output widths: the few static lengths the train step compacts its rows into, chosen from the data.

Rows are stored at the dataset's width, but after removal a batch only needs its longest remaining row
(:attr:`~icot_jax.removal.StepPlan.batch_length`). Running every step at the stored width would make a
fully internalized model (or the No-CoT baseline) cost as much as explicit CoT; running every step at its
exact length would compile once per length. Buckets sit in between: each batch runs at the smallest
bucket that holds it, and each bucket compiles once.

The automatic set (:func:`plan_widths`) looks at the batches the run will train on -- the curriculum is a
pure function of the step, so they can be sampled before training -- and picks at most ``max_buckets``
multiples of ``multiple`` that minimise the padded tokens the model computes (an exact dynamic program
over the sampled lengths). The widest bucket holds the longest row the run can ever have after removal,
capped by the stored width and by ``max_len_train`` (longer batches are skipped, never run wider).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from icot_jax.removal import Curriculum, post_removal_lengths

MAX_BUCKETS = 8
"""Default number of widths: at most this many train-step compilations per run."""
SAMPLED_BATCHES = 2048
"""Batches of the run looked at to choose the automatic buckets (all of them in shorter runs)."""


def round_up(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-int(length) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Widths:
    """The output widths of a run and what they are expected to cost."""

    buckets: tuple[int, ...]
    """Sorted widths; the last is the widest any trained batch runs at."""
    padding: float | None = None
    """Estimated padded tokens per real token over the sampled batches (``None``: not estimated)."""

    def __post_init__(self):
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"widths must be distinct positive lengths in increasing order, got {self.buckets}")

    def width(self, length: int) -> int:
        """The smallest bucket that holds a batch of ``length`` tokens after removal."""
        i = int(np.searchsorted(self.buckets, length))
        if i == len(self.buckets):
            raise ValueError(f"a batch of {length} tokens after removal is wider than the widest bucket "
                             f"({self.buckets[-1]}); raise train.length_buckets or set train.max_len_train")
        return self.buckets[i]

    def width_or(self, length: int, fallback: int) -> int:
        """:meth:`width`, or ``fallback`` (e.g. the stored width) for a batch wider than every bucket.
        Evaluation uses this: it is never skipped, unlike training batches over ``max_len_train``."""
        return self.width(length) if length <= self.buckets[-1] else fallback


def choose_buckets(lengths: Sequence[int], widest: int, *, max_buckets: int = MAX_BUCKETS,
                   multiple: int = 8) -> tuple[int, ...]:
    """At most ``max_buckets`` widths, multiples of ``multiple`` (``widest`` itself may not be), that
    minimise the total padding ``sum(bucket(l) - l)`` over ``lengths`` (every length ``<= widest``).

    ``widest`` is always a bucket, so a batch longer than every sampled one still has a width.
    """
    if max_buckets < 1 or multiple < 1:
        raise ValueError(f"max_buckets and multiple must be >= 1, got {max_buckets} and {multiple}")
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > widest:
        raise ValueError(f"a length of {lengths.max()} exceeds the widest bucket {widest}")
    candidates = np.minimum([round_up(n, multiple) for n in lengths], widest)
    values, counts = np.unique(np.append(candidates, widest), return_counts=True)
    counts[-1] -= 1  # ``widest`` was added to be a bucket, not as a batch
    return tuple(int(v) for v in _optimal_cover(values, counts, max_buckets))


def _optimal_cover(values: np.ndarray, counts: np.ndarray, k: int) -> list[int]:
    """Exact 1-D dynamic program: the subset of at most ``k`` of the sorted ``values`` (the largest always
    included) covering every value by the next chosen one at least as large, with the least
    ``sum(count * (chosen - value))``."""
    n = len(values)
    prefix_count = np.concatenate([[0], np.cumsum(counts)])
    prefix_mass = np.concatenate([[0], np.cumsum(counts * values)])

    def cover(first: np.ndarray | int, last: int):
        """Cost of covering ``values[first..last]`` by ``values[last]``."""
        in_range = prefix_count[last + 1] - prefix_count[first]
        return values[last] * in_range - (prefix_mass[last + 1] - prefix_mass[first])

    # cost[j]: least cost of values[0..j] with the buckets used so far, the last one at values[j];
    # choice[b][j]: the previous bucket's index in that solution (-1: values[j] covers everything below).
    one_bucket = np.array([cover(0, j) for j in range(n)], np.float64)
    cost, choice = one_bucket, [np.full(n, -1)]
    for _ in range(1, min(k, n)):
        new_cost, previous = one_bucket.copy(), np.full(n, -1)
        for j in range(1, n):
            before = np.arange(j)
            options = cost[before] + cover(before + 1, j)
            best = int(np.argmin(options))
            if options[best] < new_cost[j]:
                new_cost[j], previous[j] = options[best], best
        cost = new_cost
        choice.append(previous)
    chosen, j = [], n - 1
    for previous in reversed(choice):
        chosen.append(int(values[j]))
        j = int(previous[j])
        if j < 0:
            break
    return sorted(chosen)


def plan_widths(curriculum: Curriculum, loader, num_steps: int, *, multiple: int = 8,
                max_buckets: int = MAX_BUCKETS, buckets: Sequence[int] = (),
                samples: int = SAMPLED_BATCHES) -> Widths:
    """The output widths of a run of ``num_steps`` batches from ``loader`` (a whole-batch loader: every
    host must choose the same widths).

    ``buckets`` (``train.length_buckets``) fixes the set; otherwise it is chosen from up to ``samples``
    batches spread evenly over the run (:func:`choose_buckets`). Either way the widest bucket is the
    longest row the run can have after removal (rounded up to ``multiple``), capped by the stored width
    and by the curriculum's ``max_len_train``; user buckets above it are dropped.
    """
    data = loader.data
    stored = int(data.buckets[-1])
    longest = int(post_removal_lengths(data.seps, np.full(len(data), curriculum.fewest_removed())).max())
    widest = min(round_up(longest, multiple), stored, curriculum.max_len_train or stored)
    lengths, real_tokens = _sampled_lengths(curriculum, loader, num_steps, samples)
    trained = lengths <= widest  # longer batches exceed max_len_train: skipped, never run
    if buckets:
        chosen = tuple(sorted({int(b) for b in buckets if 0 < b < widest} | {widest}))
    else:
        chosen = choose_buckets(lengths[trained], widest, max_buckets=max_buckets, multiple=multiple)
    widths = Widths(chosen)
    if not trained.any():
        return widths
    run_at = np.array([widths.width(n) for n in lengths[trained]])
    padded = loader.batch_size * run_at.sum() - real_tokens[trained].sum()
    return dataclasses.replace(widths, padding=float(padded / real_tokens[trained].sum()))


def _sampled_lengths(curriculum: Curriculum, loader, num_steps: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Post-removal batch length and real tokens of up to ``samples`` batches evenly spread over the run."""
    steps = np.unique(np.linspace(0, num_steps - 1, min(num_steps, samples)).astype(np.int64))
    lengths, tokens = [], []
    for step in steps:
        batch = loader.batch(*divmod(int(step), loader.steps_per_epoch))
        plan = curriculum.plan(int(step), batch["seps"], batch["example_mask"])
        real = batch["example_mask"]
        lengths.append(plan.batch_length)
        tokens.append(int(post_removal_lengths(batch["seps"][real], plan.n_remove[real]).sum()))
    return np.array(lengths), np.array(tokens)
