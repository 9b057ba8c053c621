"""The run directory of one ``icot train``: claimed, locked, and left whole or not at all.

A new run creates its directory; a resumed run pulls it back (from a bucket) and must find its
``config.yaml``. Either way the directory is locked against a second ``icot train`` (:mod:`.lock`) before
anything is written. Until :meth:`RunSession.start` (setup done: data encoded, model built), a failure of a
new run removes everything it created, so a bad config or data file leaves no half-made run directory for
``icot eval`` to trip over; after it, the directory belongs to the run whatever happens.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
from etils import epath

from icot_jax.config import Config, save_config
from icot_jax.errors import MissingPathError, UserError, UserPathError
from icot_jax.loop.lock import RunDirLocked, RunLock
from icot_jax.loop.resume import record_config_changes, resume_config
from icot_jax.rundir import NewRunFiles, RunDir


def say(message: str) -> None:
    """A status line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class RunSession:
    """A run directory held by this process: ``run``, the ``config`` in force, and whether it ``resumed``."""

    def __init__(self, url: str | Path, *, resumed: bool):
        self.run = RunDir(url)
        self.resumed = resumed
        self.config: Config | None = None
        self.changes: dict = {}
        self.started = False
        self.lock: RunLock | None = None
        self._new_files = None if resumed else NewRunFiles(self.run.local)

    @classmethod
    def open(cls, url: str | Path, *, resumed: bool) -> RunSession:
        """Claim ``url``: pull or create it, then lock it (raises :class:`RunDirLocked` if another process has it)."""
        session = cls(url, resumed=resumed)
        try:
            session._claim()
        except BaseException:
            session.abandon()
            raise
        return session

    def _claim(self) -> None:
        if self.resumed:
            self.run.pull()
            if not (self.run.local / "config.yaml").is_file():
                raise MissingPathError(f"{self.run.url} is not a run directory of `icot train` (no config.yaml)")
        try:
            if not self.resumed:
                self._new_files.create()
            if jax.process_index() == 0:  # hosts of one job share the directory: one lock for the job
                self.lock = RunLock(self.run.local).acquire()
        except RunDirLocked:
            raise
        except OSError as error:
            path = error.filename or self.run.local
            raise UserPathError(f"run_dir {self.run.url}: cannot write {path}: {error.strerror or error}") from None
        if self.lock is not None and self.lock.describe_stale():
            say(f"{self.run.url}: {self.lock.describe_stale()}")

    def settle_config(self, config: Config | None, overrides: list[str]) -> Config:
        """The config of the run: a new run's ``config`` (with ``run_dir`` filled in), or a resumed run's
        saved one with the ``overrides`` that ``--resume`` accepts."""
        if self.resumed:
            self.config, self.changes = resume_config(self.run.local / "config.yaml", overrides)
            return self.config
        if overrides:
            raise UserError("overrides are for a resumed run; apply a new run's with load_config")
        saved = epath.Path(self.run.path("checkpoints"))
        if saved.exists() and any(saved.iterdir()):
            raise UserPathError(f"{self.run.url} already holds checkpoints: use `icot train --resume {self.run.url}`")
        self.config = dataclasses.replace(config, run_dir=self.run.url)
        return self.config

    def resume_state(self, checkpoints, state, meta: dict) -> tuple:
        """``(state, meta)`` from the newest checkpoint of a resumed run (``meta`` keeps the defaults of keys
        an older checkpoint lacks); says from which step the run continues."""
        if checkpoints.latest_step() is None:
            say(f"{self.run.url}: no checkpoint yet: starting from step 0")
            return state, meta
        state, saved = checkpoints.restore(state)
        say(f"{self.run.url}: resuming from step {saved['batch_index']}")
        if jax.process_index() == 0:
            self.run.remove_remote("tensorboard")  # rewritten from metrics.jsonl (see MetricsLog)
        return state, {**meta, **saved}

    def start(self, step: int) -> None:
        """Setup succeeded and training begins at ``step``: record the config (and a resume's changes)."""
        self.started = True
        if jax.process_index() != 0:
            return
        if not self.resumed:
            save_config(self.config, self.run.local / "config.yaml")
        elif self.changes:
            record_config_changes(self.run.local, self.config, self.changes, step)
            say(f"{self.run.url}: from step {step}: " + ", ".join(f"{k}={new} (was {old})"
                                                                   for k, (old, new) in self.changes.items()))

    def abandon(self) -> None:
        """Release the lock; a new run that has not started also removes what it created."""
        self.release()
        if not self.started and self._new_files is not None:
            self._new_files.discard()

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
