"""Stepwise internalization: the removal schedule (host) and the in-graph CoT removal (device).

The curriculum is data. On the host, :class:`Curriculum` turns the global batch index into a per-example
removal count ``n_remove: int32[B]`` (scheduled count + smoothing offset, or :data:`REMOVE_ALL`) with
NumPy only, so the host knows every count (for optimizer resets and the max-length skip) without a
device round trip. On the device, :func:`remove_cot` deletes that many CoT tokens from fixed-shape
batches with one gather, so the jitted train step never sees a new shape or Python constant.

Everything here is a pure function of the configuration, the step and the batch: resuming at step
10**6 costs O(1) and reproduces the same counts and offsets.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icot_jax.config import Mode, RemovalSide

REMOVE_ALL = 2**30
"""``n_remove`` sentinel for "remove the whole CoT". Larger than any CoT; :func:`remove_cot` clips it to
the CoT length before any index arithmetic, and it stays far from the int32 limit even if added to a
sequence length."""

OFFSET_SUPPORT = 100
"""Smoothing offsets take values ``0 .. OFFSET_SUPPORT - 1`` (the reference's ``truncate_length``)."""

_OFFSET_STREAM = 0x1C07
"""Third word of the offsets' NumPy seed, so no other (seed, step) stream in the run can collide."""


# ----------------------------------------------------------------------------------------------------
# Smoothing offsets


def offset_distribution(smoothing_lambda: float) -> np.ndarray:
    """``P(o = k) = (1 - e^-λ) e^(-λk)`` for ``k < 100``, leftover mass on ``k = 99``; ``λ = ∞`` gives ``o ≡ 0``.

    Returns float64 probabilities of shape ``[OFFSET_SUPPORT]`` summing to 1.
    """
    if not smoothing_lambda >= 0:
        raise ValueError(f"smoothing_lambda must be >= 0 (math.inf disables smoothing), got {smoothing_lambda}")
    probs = np.zeros(OFFSET_SUPPORT)
    if math.isinf(smoothing_lambda):
        probs[0] = 1.0
        return probs
    k = np.arange(OFFSET_SUPPORT)
    probs = -np.expm1(-smoothing_lambda) * np.exp(-smoothing_lambda * k)
    probs[-1] += np.exp(-smoothing_lambda * OFFSET_SUPPORT)  # the leftover 1 - sum, without cancellation
    return probs


def sample_offsets(smoothing_lambda: float, *, seed: int, step: int, batch_size: int) -> np.ndarray:
    """Per-example smoothing offsets for batch ``step``: ``int32[batch_size]``, a pure function of its arguments."""
    if math.isinf(smoothing_lambda):
        return np.zeros(batch_size, np.int32)
    rng = np.random.default_rng([seed, step, _OFFSET_STREAM])
    return rng.choice(OFFSET_SUPPORT, size=batch_size, p=offset_distribution(smoothing_lambda)).astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# Schedule


@dataclasses.dataclass(frozen=True)
class ScheduleState:
    """The schedule at one batch (see :meth:`Schedule.at`)."""

    step: int
    """Global batch index (every batch counts, including ones later skipped for length)."""
    epoch: int
    scheduled_to_remove: int | float
    """The reference's ``scheduled_to_remove``: an int, or ``math.inf`` once everything is removed."""
    advanced: bool
    """The scheduled count grew at this batch (the moment the reference may reset the optimizer)."""
    pretraining: bool
    """``epoch < pretrain_epochs``: every example gets exactly ``remove_start_from``, no smoothing."""

    @property
    def remove_all(self) -> bool:
        """The whole CoT of every example is removed at this batch."""
        return math.isinf(self.scheduled_to_remove)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many CoT tokens are scheduled for removal at each batch, in closed form.

    Reproduces the reference's counter (``src/train.py``): with ``E = ceil(N / B)`` batches per epoch and
    ``S = round(E / Δ)`` batches per removed token, a global counter (never reset at epoch boundaries) is
    checked at the start of each batch -- if it equals ``S`` (or ``S == 0``), ``scheduled += 1`` and the
    counter restarts -- and then grows by one only outside the pretraining epochs. The first ``S`` batches
    after pretraining therefore have ``scheduled = remove_start_from``. Once ``scheduled`` reaches
    ``remove_all_when_remove_beyond``, the whole CoT is removed for good.
    """

    num_examples: int
    batch_size: int
    remove_per_epoch: float
    """Δ: tokens removed per epoch (a float; ``round`` is Python's, half to even, as in the reference)."""
    pretrain_epochs: int = 0
    remove_start_from: int = 0
    remove_all_when_remove_beyond: float = math.inf

    def __post_init__(self):
        if self.num_examples < 1 or self.batch_size < 1:
            raise ValueError(f"num_examples and batch_size must be >= 1, got {self.num_examples}, {self.batch_size}")
        if not self.remove_per_epoch > 0:
            raise ValueError(f"remove_per_epoch must be > 0, got {self.remove_per_epoch}")
        if self.pretrain_epochs < 0 or self.remove_start_from < 0:
            raise ValueError("pretrain_epochs and remove_start_from must be >= 0")

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the last one possibly short (``ceil(N / B)``)."""
        return -(-self.num_examples // self.batch_size)

    @property
    def steps_per_removed_token(self) -> int:
        """``S = round(steps_per_epoch / Δ)``; 0 means one more token at every batch."""
        return int(round(self.steps_per_epoch / self.remove_per_epoch))

    def _scheduled(self, step: int) -> int:
        """The finite scheduled count at batch ``step >= 0`` (before the remove-all rule)."""
        every = self.steps_per_removed_token
        if every == 0:  # the check fires at every batch, pretraining included
            return self.remove_start_from + step + 1
        counted = step - self.pretrain_epochs * self.steps_per_epoch  # batches since pretraining ended
        return self.remove_start_from + max(counted, 0) // every

    def at(self, step: int) -> ScheduleState:
        """The schedule at global batch ``step`` in O(1)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        scheduled = self._scheduled(step)
        remove_all = scheduled >= self.remove_all_when_remove_beyond
        # The reference compares with the previous batch's value, which is inf once everything is gone.
        before = self._scheduled(step - 1) if step > 0 else self.remove_start_from
        previously_all = before >= self.remove_all_when_remove_beyond
        epoch = step // self.steps_per_epoch
        return ScheduleState(
            step=step,
            epoch=epoch,
            scheduled_to_remove=math.inf if remove_all else scheduled,
            advanced=scheduled > before and not previously_all,
            pretraining=epoch < self.pretrain_epochs,
        )


# ----------------------------------------------------------------------------------------------------
# Host-side view of a batch


def cot_lengths(seps: np.ndarray) -> np.ndarray:
    """CoT tokens between the first and second separator: ``int32[B]`` (0 for filler rows)."""
    seps = np.asarray(seps)
    return np.maximum(seps[:, 1] - seps[:, 0] - 1, 0).astype(np.int32)


def removed_counts(seps: np.ndarray, n_remove: np.ndarray) -> np.ndarray:
    """Tokens :func:`remove_cot` actually deletes per example: ``min(n_remove, cot_length)``."""
    return np.clip(np.asarray(n_remove), 0, cot_lengths(seps)).astype(np.int32)


def post_removal_lengths(seps: np.ndarray, n_remove: np.ndarray) -> np.ndarray:
    """Real (unpadded) length of each example after removal: ``int32[B]``."""
    seps = np.asarray(seps)
    return (seps[:, 2] + 1 - removed_counts(seps, n_remove)).astype(np.int32)


def reference_batch_length(seps: np.ndarray, n_remove: np.ndarray, example_mask: np.ndarray) -> int:
    """The length of the batch after removal: its longest real row (0 when it has none).

    The reference (at its current commit) cuts each row at its own last EOS after removal and re-pads the
    batch, so this is the length its ``max_len_train`` skip tests, and the narrowest width the compacted
    batch fits in.
    """
    real = np.asarray(example_mask, bool)
    if not real.any():
        return 0
    return int(post_removal_lengths(np.asarray(seps)[real], np.asarray(n_remove)[real]).max())


# ----------------------------------------------------------------------------------------------------
# Per-batch plan


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the host decided for one batch; ``n_remove`` goes to the train step."""

    schedule: ScheduleState
    n_remove: np.ndarray
    """``int32[B]``: tokens to remove per example (``REMOVE_ALL`` = the whole CoT; 0 for filler rows)."""
    cot_left: bool
    """Some real example of this batch keeps at least one CoT token after removal."""
    reset_optimizer: bool
    """Rebuild the optimizer state before this batch's update."""
    batch_length: int
    """:func:`reference_batch_length`: the longest real row after removal."""
    skip: bool = False
    """``batch_length`` exceeds the curriculum's ``max_len_train``: the batch is not trained on (the
    schedule has still advanced past it, as in the reference)."""
    resets_best: bool = False
    """The reference's best-score reset: an evaluation after this batch counts as the new best whatever its
    accuracy, because the model is still changing task. The reference sets the flag at *every* batch that
    still has CoT after removal, but only where its removal code runs (something scheduled, or smoothing
    on): a run that never removes anything keeps its highest accuracy."""


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """The internalization curriculum of a run: schedule, mode, smoothing, resets.

    Modes: ``icot`` follows :class:`Schedule` with smoothing; ``explicit`` never removes anything (no
    smoothing, no resets); ``no_cot`` removes the whole CoT from the first batch.
    """

    schedule: Schedule
    mode: Mode = "icot"
    smoothing_lambda: float = math.inf
    """λ of :func:`offset_distribution`; ``math.inf`` disables smoothing."""
    reset_optimizer: bool = True
    """Reset the optimizer when the schedule advances while the previous batch still had CoT."""
    seed: int = 0
    max_len_train: int | None = None
    """Skip batches longer than this after removal [max_len_train]; ``None`` trains on every batch."""

    def __post_init__(self):
        if self.max_len_train is not None and self.max_len_train < 1:
            raise ValueError(f"max_len_train must be >= 1 or None, got {self.max_len_train}")
        if self.mode not in typing.get_args(Mode):
            raise ValueError(f"mode must be one of {typing.get_args(Mode)}, got {self.mode!r}")
        offset_distribution(self.smoothing_lambda)  # validates λ

    def state(self, step: int, scheduled: ScheduleState | None = None) -> ScheduleState:
        """The schedule at batch ``step`` as seen by this mode: the fixed :class:`Schedule`'s, or
        ``scheduled`` when a rule outside this class decides the count (``icot_jax.adaptive``)."""
        if scheduled is None:
            state = self.schedule.at(step)
        elif scheduled.step != step:
            raise ValueError(f"a schedule state of batch {scheduled.step} was given for batch {step}")
        else:
            state = scheduled
        if self.mode == "icot":
            return state
        count = 0 if self.mode == "explicit" else math.inf
        return dataclasses.replace(state, scheduled_to_remove=count, advanced=False, pretraining=False)

    def n_remove(self, step: int, batch_size: int, scheduled: ScheduleState | None = None) -> np.ndarray:
        """``int32[batch_size]`` training removal counts at batch ``step``: scheduled count + offsets
        (``scheduled``: see :meth:`state`)."""
        state = self.state(step, scheduled)
        if state.pretraining:  # the reference overwrites to_remove with remove_start_from
            return np.full(batch_size, self.schedule.remove_start_from, np.int32)
        if state.remove_all:
            return np.full(batch_size, REMOVE_ALL, np.int32)
        offsets = sample_offsets(self.smoothing_lambda if self.mode == "icot" else math.inf, seed=self.seed,
                                 step=step, batch_size=batch_size)
        return np.minimum(state.scheduled_to_remove + offsets.astype(np.int64), REMOVE_ALL).astype(np.int32)

    def eval_n_remove(self, step: int, batch_size: int, scheduled: ScheduleState | None = None) -> np.ndarray:
        """Evaluation counts after training batch ``step``: the scheduled count for every example, no
        offsets (the reference evaluates with its current ``scheduled_to_remove``, offsets disabled)."""
        state = self.state(step, scheduled)
        count = REMOVE_ALL if state.remove_all else state.scheduled_to_remove
        return np.full(batch_size, count, np.int32)

    def plan(self, step: int, seps: np.ndarray, example_mask: np.ndarray, *, prev_cot_left: bool = True,
             scheduled: ScheduleState | None = None) -> StepPlan:
        """Plan batch ``step`` from its host-side ``seps`` ``[B, 3]`` and ``example_mask`` ``[B]``
        (``scheduled``: the schedule at ``step`` when not the fixed one, see :meth:`state`).

        ``prev_cot_left`` is :attr:`StepPlan.cot_left` of the previous batch (``True`` before the first
        batch, as in the reference). On resume, recompute it with ``plan(step - 1, ...)`` on that batch.
        With several hosts, plan the *global* batch (the same arrays on every host) so that all hosts take
        the same reset and skip decisions and draw distinct offsets per row; each host then feeds its own
        rows of ``n_remove``.
        """
        seps, real = np.asarray(seps), np.asarray(example_mask, bool)
        if seps.ndim != 2 or seps.shape[1] != 3 or real.shape != seps.shape[:1]:
            raise ValueError(f"expected seps [B, 3] and example_mask [B], got {seps.shape} and {real.shape}")
        state = self.state(step, scheduled)
        n_remove = np.where(real, self.n_remove(step, len(seps), scheduled), 0).astype(np.int32)
        cot_left = bool((real & (removed_counts(seps, n_remove) < cot_lengths(seps))).any())
        batch_length = reference_batch_length(seps, n_remove, real)
        return StepPlan(
            schedule=state,
            n_remove=n_remove,
            cot_left=cot_left,
            reset_optimizer=self.reset_optimizer and state.advanced and prev_cot_left,
            batch_length=batch_length,
            skip=self.max_len_train is not None and batch_length > self.max_len_train,
            resets_best=cot_left and (state.scheduled_to_remove > 0 or self._smoothing),
        )

    @property
    def _smoothing(self) -> bool:
        """Removal smoothing is on (``icot`` mode with a finite λ)."""
        return self.mode == "icot" and not math.isinf(self.smoothing_lambda)

    def fewest_removed(self) -> int:
        """The smallest count any batch of the run removes from a row (before clipping to its CoT): the
        longest a row can be after removal is its length minus this many CoT tokens."""
        if self.mode == "explicit":
            return 0
        return REMOVE_ALL if self.mode == "no_cot" else self.schedule.remove_start_from


# ----------------------------------------------------------------------------------------------------
# In-graph removal


class Removed(NamedTuple):
    """The output of :func:`remove_cot`: ``[B, W]`` arrays (``W`` the output width) and ``[B]``/``[B, 3]``."""

    input_ids: jax.Array
    """``int32[B, W]``: kept tokens compacted to the left, ``pad_id`` after the last EOS."""
    position_ids: jax.Array
    """``int32[B, W]``: ``0, 1, ...`` (or the original positions of kept tokens with ``keep_position``)."""
    attention_mask: jax.Array
    """``bool[B, W]``: True for real tokens (up to and including the last EOS)."""
    loss_mask: jax.Array
    """``bool[B, W]``: True where ``input_ids`` holds a training target (after the first EOS, up to and
    including the last EOS). Position ``j`` is predicted from ``logits[:, j - 1]``."""
    seps: jax.Array
    """``int32[B, 3]``: separator positions after removal."""
    n_removed: jax.Array
    """``int32[B]``: tokens actually removed (``n_remove`` clipped to ``[0, CoT length]``)."""


def remove_cot(input_ids: jax.Array, seps: jax.Array, n_remove: jax.typing.ArrayLike, *, side: RemovalSide = "left",
               keep_position: bool = False, pad_id: int, width: int | None = None) -> Removed:
    """Delete ``n_remove[i]`` CoT tokens from row ``i`` and shift the rest left, inside jit.

    ``side="left"`` deletes positions ``[sep0 + 1, min(sep0 + 1 + n, sep1))`` (the paper), ``"right"``
    deletes ``[max(sep1 - n, sep0 + 1), sep1)``. Separators and answer are never removed. Output position
    ``j`` reads input position ``j`` before the removed span and ``j + removed`` from its start on; the
    freed tail becomes ``pad_id``. One gather, no data-dependent shapes.

    ``width`` (static; default: the input's length) is the output's length. Rows are read at their stored
    width and written compacted into ``width`` columns, so a batch that lost most of its CoT costs the
    model only the tokens it has left. The caller chooses ``width`` >= every row's length after removal
    (:func:`post_removal_lengths`; a longer row would lose its tail, which no check inside jit can see).

    With ``keep_position=True`` kept tokens keep their original position ids. (The reference also shifts
    the token just before the span -- an off-by-one we do not reproduce.) ``n_remove`` is any integer
    array-like of length ``B`` (a list works); it is cast to ``int32``.
    """
    if side not in typing.get_args(RemovalSide):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    input_ids, seps, n_remove = jnp.asarray(input_ids), jnp.asarray(seps), jnp.asarray(n_remove)
    length = input_ids.shape[1]
    width = length if width is None else width
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    seps = seps.astype(jnp.int32)
    q_end, cot_end = seps[:, 0], seps[:, 1]
    cot_len = jnp.maximum(cot_end - q_end - 1, 0)
    removed = jnp.clip(n_remove.astype(jnp.int32), 0, cot_len)  # before any arithmetic: REMOVE_ALL is safe
    start = q_end + 1 if side == "left" else cot_end - removed
    j = jnp.arange(width, dtype=jnp.int32)[None, :]
    source = j + jnp.where(j >= start[:, None], removed[:, None], 0)
    new_seps = seps - removed[:, None] * jnp.array([0, 1, 1], jnp.int32)
    attention_mask = j <= new_seps[:, 2:3]
    ids = jnp.take_along_axis(input_ids, jnp.minimum(source, length - 1), axis=1)
    ids = jnp.where(attention_mask, ids, jnp.asarray(pad_id, input_ids.dtype))
    positions = jnp.where(attention_mask, source, j) if keep_position else jnp.broadcast_to(j, ids.shape)
    loss_mask = attention_mask & (j > new_seps[:, 0:1])
    return Removed(ids, positions, attention_mask, loss_mask, new_seps, removed)
