"""Run checkpoints with orbax: the full train state for exact resume, and the best params for evaluation.

Layout under a run directory::

    checkpoints/<step>/state   params, optimizer state, step, RNG key (sharded arrays, any mesh)
    checkpoints/<step>/meta    JSON: epoch, data position, schedule state, best-score bookkeeping
    best/<step>/params         params of the best evaluation so far (the reference's "best" logic)
    best/<step>/meta           JSON: the evaluation that made it best

Saves are asynchronous (training continues while arrays are written) and atomic (orbax writes to a
temporary folder and renames it), so a run killed mid-save resumes from the previous complete step.
Every host calls every method: orbax coordinates multi-host writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from icot_jax.errors import MissingPathError
from icot_jax.rundir import is_remote


def _manager(directory: Path | str, keep: int, read_only: bool) -> ocp.CheckpointManager:
    if read_only:  # save_interval_steps and create as orbax forces them, so that it does not warn about them
        options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=options)


def _directory(run_dir: Path | str) -> str:
    """``run_dir`` as orbax needs it: a URL as given, a local path made absolute (orbax refuses relative
    paths when it finalizes a save)."""
    text = str(run_dir)
    return text if is_remote(text) else str(Path(text).absolute())


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing ``tree``: the restore target for orbax."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
    """The checkpoints of one run: ``latest`` (full state, last ``keep``) and ``best`` (params only).

    ``read_only``: only restore (creates no folder; ``keep`` is unused), as :func:`icot_jax.runs.open_run` does.
    """

    def __init__(self, run_dir: Path | str, *, keep: int = 1, read_only: bool = False):
        run_dir = _directory(run_dir)
        self.latest = _manager(f"{run_dir}/checkpoints", keep, read_only)
        self.best = _manager(f"{run_dir}/best", 1, read_only)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save the full train state and its JSON metadata at ``step`` (no-op if already saved)."""
        if step in self.latest.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)

    def save_best(self, step: int, params: Any, meta: dict) -> None:
        """Replace the best checkpoint with ``params`` (and the evaluation in ``meta``)."""
        if step in self.best.all_steps():
            return
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        self.best.save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.latest.latest_step()

    def restore(self, state_like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` at ``step`` (default: latest) into the structure/shardings of ``state_like``."""
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise MissingPathError(f"{self.latest.directory}: no checkpoint to resume from")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(state_like)), meta=ocp.args.JsonRestore()
        )
        restored = self.latest.restore(step, args=args)
        return restored.state, dict(restored.meta)

    def restore_best(self, params_like: Any) -> tuple[Any, dict]:
        """Restore ``(params, meta)`` of the best checkpoint into the structure of ``params_like``."""
        step = self.best.latest_step()
        if step is None:
            raise MissingPathError(f"{self.best.directory}: no best checkpoint")
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_like(params_like)), meta=ocp.args.JsonRestore()
        )
        restored = self.best.restore(step, args=args)
        return restored.params, dict(restored.meta)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the managers."""
        self.latest.close()
        self.best.close()


def read_meta(run_dir: Path | str, which: str = "checkpoints") -> dict:
    """The JSON metadata of the newest checkpoint in ``run_dir/<which>`` without loading arrays."""
    manager = ocp.CheckpointManager(f"{_directory(run_dir)}/{which}", options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise MissingPathError(f"{run_dir}/{which}: no checkpoint")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    manager.close()
    return dict(meta)
