"""SIGTERM (a TPU preemption notice) and Ctrl-C as a request the training loop honours between batches."""

from __future__ import annotations

import signal
import sys


class Preemption:
    """Turns SIGTERM (TPU preemption notice) and a first Ctrl-C (SIGINT) into a request that the loop honours
    between batches: save a checkpoint, then stop. A second Ctrl-C aborts at once, without saving."""

    def __init__(self, run_url: str):
        self.run_url = run_url
        self.signal: signal.Signals | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        """A stop was requested."""
        return self.signal is not None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            sys.stderr.write(f"\nsecond Ctrl-C: aborting without saving; `icot train --resume {self.run_url}` "
                             "continues from the newest checkpoint\n")
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)
        if signum == signal.SIGINT:
            sys.stderr.write("\nCtrl-C: saving a checkpoint after this batch, then stopping "
                             "(Ctrl-C again aborts without saving)\n")

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
