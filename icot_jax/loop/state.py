"""Where a run stands between two batches: a frozen record with one step convention.

``step`` counts the batches done, skipped ones included. It is the global index of the next batch, and
the ``step`` of everything written after a batch: its metrics line, an evaluation, a checkpoint. So the
batch with index ``i`` is logged, evaluated after and checkpointed as step ``i + 1``, and an evaluation
at step ``s`` uses the curriculum of the last batch trained, ``s - 1``.
"""

from __future__ import annotations

import dataclasses

from icot_jax.adaptive import AdaptiveState
from icot_jax.removal import ScheduleState, StepPlan


@dataclasses.dataclass(frozen=True)
class LoopState:
    """The training loop's state; saved as each checkpoint's JSON metadata (:meth:`to_meta`)."""

    step: int = 0
    """Batches done (skipped ones included): the global index of the next batch."""
    prev_cot_left: bool = True
    """:attr:`StepPlan.cot_left` of the last batch (the optimizer-reset rule looks one batch back)."""
    best_accuracy: float | None = None
    best_step: int | None = None
    best_reset: bool = False
    """A batch since the last evaluation reset the best score (:attr:`StepPlan.resets_best`)."""
    skipped_batches: int = 0
    """Batches not trained on because they were longer than ``train.max_len_train`` after removal."""
    adaptive: AdaptiveState | None = None
    """The adaptive schedule's state after the last batch (``train.schedule: adaptive``; else ``None``)."""
    seconds: float = 0.0
    """The run's training time (wall seconds, evaluations included) up to this state: a resumed run's
    clock continues from its checkpoint's, so a run trained in pieces reports its total."""
    compiles: int = 0
    """Train-step compilations over every piece of the run up to this state (each piece compiles its
    widths afresh, so a resumed run's total exceeds the number of widths it used)."""
    lr_decay_from: int | None = None
    """``train.lr_decay: after_removal``: the first batch whose scheduled count removed every CoT token
    (the LR decays from there, :func:`lr_scale`); ``None`` until then or without a decay."""

    def after(self, plan: StepPlan) -> LoopState:
        """The state once the batch planned as ``plan`` has been trained (or skipped)."""
        return dataclasses.replace(self, step=self.step + 1, prev_cot_left=plan.cot_left,
                                   best_reset=self.best_reset or plan.resets_best,
                                   skipped_batches=self.skipped_batches + int(plan.skip))

    def decaying(self, schedule: ScheduleState, max_cot: int) -> LoopState:
        """The state with :attr:`lr_decay_from` set to this batch (:attr:`step`) if it is the first one whose
        scheduled count removes every CoT token (``max_cot``: the longest training CoT), unchanged otherwise."""
        no_cot = not schedule.pretraining and (schedule.remove_all or schedule.scheduled_to_remove >= max_cot)
        if self.lr_decay_from is not None or not no_cot:
            return self
        return dataclasses.replace(self, lr_decay_from=self.step)

    def evaluated(self, accuracy: float) -> tuple[LoopState, bool]:
        """``(state, new_best)`` after an evaluation at :attr:`step` scored ``accuracy``."""
        new_best = is_new_best(self.best_accuracy, accuracy, reset=self.best_reset)
        best = {"best_accuracy": accuracy, "best_step": self.step} if new_best else {}
        return dataclasses.replace(self, best_reset=False, **best), new_best

    def to_meta(self) -> dict:
        """The checkpoint's JSON metadata (``batch_index`` is :attr:`step`, the name checkpoints use)."""
        meta = dataclasses.asdict(self)
        meta["batch_index"] = meta.pop("step")
        meta["adaptive"] = self.adaptive.to_json() if self.adaptive else None
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> LoopState:
        """The state saved by :meth:`to_meta`; keys an older checkpoint lacks keep their defaults."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"step", "adaptive"}
        saved = meta.get("adaptive")
        return cls(step=meta["batch_index"], adaptive=AdaptiveState.from_json(saved) if saved else None,
                   **{k: v for k, v in meta.items() if k in fields})


def is_new_best(best_accuracy: float | None, accuracy: float, *, reset: bool) -> bool:
    """The reference's best-checkpoint rule: after a reset (:attr:`StepPlan.resets_best` since the last
    evaluation) every accuracy is the new best; otherwise only a strictly higher one is."""
    return reset or best_accuracy is None or accuracy > best_accuracy


def lr_scale(batch_index: int, decay_from: int | None, total: int) -> float:
    """The LR multiplier of batch ``batch_index`` under ``train.lr_decay: after_removal``: 1 before the decay
    starts (``decay_from`` None), then linear from 1 at ``decay_from`` down to ``1 / (total - decay_from)``
    at the last batch, ``total - 1``: every batch still learns, and the run ends at a near-zero LR."""
    if decay_from is None:
        return 1.0
    return max(total - batch_index, 1) / max(total - decay_from, 1)
