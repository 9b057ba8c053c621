"""Stopping a diverged run at a checkpoint it can be resumed from.

A checkpoint is *good* when its parameters are finite **and** the loss computed from them (the next
batch's) is finite: an exploding update can leave finite but huge weights whose next loss is NaN, so
"the newest checkpoint before the NaN" is not necessarily good. The guard therefore checks the
parameters before every save (a non-finite state is never saved) and the loss of the first batch after
every save; when the run diverges it deletes the checkpoints newer than the last good one, so that
``icot train --resume`` starts from it.

The loss is read on the host only at logged steps, epoch ends and the batch after a save (each read
waits for the device); between reads a NaN goes unnoticed for at most ``log_every_steps`` batches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or infinite; the run stopped at its last good checkpoint.

    ``step``: the 1-based step whose loss (or update) was not finite; ``good_step``: the checkpoint to
    resume from (None when the run has none).
    """

    def __init__(self, message: str, *, step: int, good_step: int | None):
        super().__init__(message)
        self.step = step
        self.good_step = good_step


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class DivergenceGuard:
    """Tracks the last good checkpoint of a run and raises :class:`TrainingDiverged` on a non-finite value.

    ``run_url`` and ``lr`` only shape the error message (the resume command it suggests).
    """

    def __init__(self, checkpoints, run_url: str, lr: float):
        self.checkpoints = checkpoints
        self.run_url = run_url
        self.lr = lr
        self.good_step: int | None = None
        self.unverified_step: int | None = None
        """The newest checkpoint, saved but not yet followed by a finite loss."""

    @property
    def wants_loss(self) -> bool:
        """The next batch's loss decides whether the newest checkpoint is good: read it."""
        return self.unverified_step is not None

    def check_loss(self, metrics: dict, batch_index: int) -> dict:
        """``metrics`` as Python floats; raises if the loss of batch ``batch_index`` (0-based) is not finite."""
        values = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(values["loss"]):
            self._diverged(f"the loss is {values['loss']} at step {batch_index + 1}", batch_index + 1)
        if self.unverified_step is not None:
            self.good_step, self.unverified_step = self.unverified_step, None
        return values

    def check_params(self, params, step: int) -> None:
        """Before saving ``step``: raise if a parameter is not finite (the update of step ``step`` broke it)."""
        if not bool(_all_finite(params)):
            self._diverged(f"a parameter is not finite after step {step}", step)

    def saved(self, step: int) -> None:
        """A checkpoint was saved at ``step``; the next loss read decides whether it is good."""
        self.unverified_step = step

    def _diverged(self, what: str, step: int):
        self.checkpoints.wait()
        bad = [s for s in self.checkpoints.latest.all_steps() if self.good_step is None or s > self.good_step]
        for s in bad:  # so that `--resume` starts from the good one, and later saves do not collide with them
            self.checkpoints.latest.delete(s)
        removed = f" (removed the later checkpoint {', '.join(map(str, bad))})" if bad else ""
        if self.good_step is None:
            where = f"no checkpoint of this run is known to be good{removed}; start again with a lower train.lr"
        else:
            where = (f"the last good checkpoint is step {self.good_step}: finite parameters and a finite loss at "
                     f"the next step{removed}; resume from it with a lower learning rate: "
                     f"`icot train --resume {self.run_url} train.lr={self.lr / 10:g}`")
        raise TrainingDiverged(f"training diverged: {what}; {where}", step=step, good_step=self.good_step)
