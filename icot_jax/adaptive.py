"""The adaptive internalization schedule: the next CoT token goes once the model has recovered.

The fixed schedule (:class:`icot_jax.removal.Schedule`, the reference's) gives every removed token the
same number of steps. At small scale that number decides everything (docs/RESULTS.md): the first tokens
are internalized in a few hundred steps, the carries of a running sum need thousands. This rule lets the
model set the pace. After pretraining, the scheduled count advances

* **recovered**: once at least ``min_steps`` batches have trained at the current count and the running
  mean of the training token accuracy over the last ``window`` logged batches at this count has reached
  ``recovery`` times the *baseline*: the highest running mean at any earlier advance, i.e. the best
  level the model had before a removal. The bar never falls: if each advance only reset it to the level
  just reached, a model that regains 0.99 of its level at each token would lose 1% per token and the
  schedule would speed up as the model degrades (measured on 2x2: docs/RESULTS.md). The first advance
  after pretraining has no removal to recover from and only waits ``min_steps`` and a full window;
* **max_steps**: at the latest after ``max_steps`` batches at the current count, recovered or not.

The accuracy is ``train.adaptive_signal``: the token accuracy over every target (the default), over
the answer's targets alone (``answer_token_accuracy``), or the validation exact match (``val_accuracy``).
The answer is a small share of the targets, and the CoT tokens still left are predicted as well as before
a removal, so the first can look recovered long before exact match is (measured on 3x3: docs/RESULTS.md).
The second is no better there: while CoT is left the answer can be read off it, so its accuracy barely
drops at a removal. Only generation with the removed tokens absent shows what the model has internalized:
``val_accuracy`` is the exact match of greedy decoding on the validation split at the current count, read
at each evaluation (``eval.every_steps`` sets how often; the window then counts evaluations).

A recovery that is already complete at the first check (the first time both conditions can be judged)
advances by twice the tokens of the last advance, up to ``max_tokens_per_advance``; any other advance
removes one token. The count stops at the longest CoT of the training set (nothing is left to remove),
and ``remove_all_when_remove_beyond`` and pretraining act on it as they do on the fixed count.

Everything here runs on the host and is pure: :meth:`AdaptiveRule.observe` maps (state, batch index,
a reading of the signal or ``None``) to the next state, so a run that saves the state with its checkpoint
(:meth:`AdaptiveState.to_json`) resumes with exactly the decisions of an uninterrupted one. The loop
passes a training metric only at the batches whose metrics it reads anyway (every ``log_every_steps``),
and the validation exact match only after the evaluations the run makes anyway, so the rule never adds a
device synchronisation. The per-example counts still reach the one compiled
train step as data (:meth:`icot_jax.removal.Curriculum.plan` with ``scheduled=``).
"""

from __future__ import annotations

import dataclasses
import math

from icot_jax.config import TrainConfig, adaptive_problem
from icot_jax.removal import Schedule, ScheduleState

REASONS = ("recovered", "max_steps")
"""Why the scheduled count advanced (``schedule_advance`` in ``metrics.jsonl``)."""


@dataclasses.dataclass(frozen=True)
class AdaptiveState:
    """Where the adaptive schedule stands after a batch; saved with each checkpoint."""

    scheduled: int
    """The count scheduled for removal from batch ``since`` on (before the remove-all rule)."""
    since: int
    """The first batch at this count (the end of pretraining before the first advance)."""
    baseline: float | None = None
    """What recovery is judged against: the highest running mean at any advance so far (``None`` before
    the first advance)."""
    level: float | None = None
    """The running mean when the count last advanced (``None`` before the first advance, or when no
    accuracy had been logged at the count)."""
    recent: tuple[float, ...] = ()
    """Token accuracies logged at this count, newest last, at most ``window`` of them."""
    checks: int = 0
    """Recovery checks made at this count (``min_steps`` passed and the window full) that failed."""
    tokens: int = 1
    """Tokens the last advance removed (an immediate recovery doubles it for the next one)."""
    reason: str | None = None
    """Why the count last advanced (one of :data:`REASONS`; ``None`` before the first advance)."""

    def to_json(self) -> dict:
        """A JSON-ready dict (checkpoint metadata)."""
        return {**dataclasses.asdict(self), "recent": list(self.recent)}

    @classmethod
    def from_json(cls, saved: dict) -> AdaptiveState:
        """The inverse of :meth:`to_json` (floats survive JSON exactly)."""
        return cls(**{**saved, "recent": tuple(saved["recent"])})


@dataclasses.dataclass(frozen=True)
class AdaptiveRule:
    """The parameters of the adaptive schedule (``train.adaptive_*``) and its state transitions."""

    schedule: Schedule
    """The run's fixed schedule, for its epoch length, pretraining, start count and remove-all threshold
    (its Δ is not used)."""
    window: int = 4
    recovery: float = 0.98
    min_steps: int = 200
    max_steps: int = 3000
    max_tokens_per_advance: int = 1
    longest_cot: int | None = None
    """The count never advances past this (the longest training CoT); ``None``: no ceiling."""

    def __post_init__(self):
        problem = adaptive_problem(self.window, self.recovery, self.min_steps, self.max_steps,
                                   self.max_tokens_per_advance)
        if problem is not None:
            name, expected = problem
            raise ValueError(f"{name} is {getattr(self, name)!r}; expected {expected}")

    @property
    def first_step(self) -> int:
        """The first batch after pretraining: the count starts advancing from here."""
        return self.schedule.pretrain_epochs * self.schedule.steps_per_epoch

    def initial(self) -> AdaptiveState:
        """The state before the first batch."""
        return AdaptiveState(scheduled=self.schedule.remove_start_from, since=self.first_step)

    def at(self, state: AdaptiveState, step: int) -> ScheduleState:
        """The schedule at batch ``step``, given ``state`` after batch ``step - 1`` (for
        :meth:`icot_jax.removal.Curriculum.plan`)."""
        epoch = step // self.schedule.steps_per_epoch
        remove_all = state.scheduled >= self.schedule.remove_all_when_remove_beyond
        return ScheduleState(step=step, epoch=epoch,
                             scheduled_to_remove=math.inf if remove_all else state.scheduled,
                             advanced=step == state.since and state.reason is not None,
                             pretraining=epoch < self.schedule.pretrain_epochs)

    def finished(self, state: AdaptiveState) -> bool:
        """Nothing is left to schedule: everything is removed, or the count reached the longest CoT."""
        ceiling = min(self.schedule.remove_all_when_remove_beyond,
                      math.inf if self.longest_cot is None else self.longest_cot)
        return state.scheduled >= ceiling

    def observe(self, state: AdaptiveState, step: int, token_accuracy: float | None) -> AdaptiveState:
        """The state after batch ``step``: ``token_accuracy`` is the signal's reading after it (its training
        token accuracy when the loop read its metrics, or the validation exact match of an evaluation
        after it), else ``None`` (nothing read, or the batch was skipped)."""
        if step < state.since or self.finished(state):
            return state
        recent = state.recent if token_accuracy is None else (*state.recent, float(token_accuracy))[-self.window:]
        trained = step + 1 - state.since
        if trained >= self.max_steps:
            level = sum(recent) / len(recent) if recent else None
            return self._advance(state, step + 1, 1, "max_steps", level)
        if token_accuracy is None or trained < self.min_steps or len(recent) < self.window:
            return dataclasses.replace(state, recent=recent)
        level = sum(recent) / len(recent)
        if state.baseline is not None and level < self.recovery * state.baseline:
            return dataclasses.replace(state, recent=recent, checks=state.checks + 1)
        immediate = state.baseline is not None and state.checks == 0
        tokens = min(2 * state.tokens, self.max_tokens_per_advance) if immediate else 1
        return self._advance(state, step + 1, tokens, "recovered", level)

    def _advance(self, state: AdaptiveState, since: int, tokens: int, reason: str, level: float | None) -> AdaptiveState:
        baseline = max((x for x in (state.baseline, level) if x is not None), default=None)
        scheduled = state.scheduled + tokens
        if self.longest_cot is not None:
            scheduled = min(scheduled, max(self.longest_cot, state.scheduled))
        return AdaptiveState(scheduled=scheduled, since=since, baseline=baseline, level=level, tokens=tokens,
                             reason=reason)


def advance_record(before: AdaptiveState, after: AdaptiveState) -> dict | None:
    """The ``metrics.jsonl`` record of an advance between two consecutive states (``None`` if none):
    ``step`` is the number of batches trained when it was decided."""
    if after.since == before.since:
        return None
    return {"step": after.since, "schedule_advance": after.reason, "scheduled_from": before.scheduled,
            "scheduled_to": after.scheduled, "steps_at_count": after.since - before.since,
            "accuracy_mean": after.level, "baseline": before.baseline}


def rule_for(train: TrainConfig, schedule: Schedule, *, longest_cot: int | None = None) -> AdaptiveRule | None:
    """The adaptive rule of a run's ``train`` config, or ``None`` for ``train.schedule: fixed``.

    The parameters were checked when the config was loaded (:func:`icot_jax.config.validate`).
    """
    if train.schedule == "fixed":
        return None
    return AdaptiveRule(schedule=schedule, window=train.adaptive_window, recovery=train.adaptive_recovery,
                        min_steps=train.adaptive_min_steps, max_steps=train.adaptive_max_steps,
                        max_tokens_per_advance=train.adaptive_max_tokens_per_advance, longest_cot=longest_cot)
