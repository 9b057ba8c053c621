"""Deterministic, resumable, host-sliced batches of fixed shape from an `EncodedDataset`.

The global order of an epoch is a pure function of `(seed, epoch)`, so batch `step` of epoch
`epoch` can be rebuilt from scratch: resuming at a step yields exactly what the uninterrupted
iterator would have. Every host computes the same global batch and keeps its own contiguous block
of `batch_size / process_count` rows; the bucket length is chosen from the whole global batch so
that all hosts agree on the shape.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from icot_jax.data.tokenize import EncodedDataset, smallest_bucket
from icot_jax.errors import UserError

Batch = dict[str, np.ndarray]


class BatchLoader:
    """Batches of `batch_size` rows (global) with the keys of docs/architecture.md, "Batches".

    `steps_per_epoch = ceil(N / batch_size)` as in the reference; the last batch of an epoch is
    completed with filler rows: all `pad_id`, `example_mask=False`, `index=-1` and
    `seps = [0, 0, 0]`, so the loss region (after the first EOS up to the last) is empty.
    `shuffle=False` keeps dataset order (evaluation).
    """

    def __init__(
        self,
        data: EncodedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax  # only here: data preparation needs no accelerator runtime

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if len(data) == 0:
            raise UserError("cannot load batches from an empty dataset")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.rows_per_host = batch_size // process_count
        self.steps_per_epoch = -(-len(data) // batch_size)
        self._order_cache: tuple[int, np.ndarray] | None = None

    def global_view(self) -> "BatchLoader":
        """A loader of whole global batches with the same order (``self`` on a single host): every host
        plans the global batch, so resets, skips and smoothing offsets agree across hosts."""
        if self.process_count == 1:
            return self
        return BatchLoader(self.data, self.batch_size, seed=self.seed, shuffle=self.shuffle,
                           process_index=0, process_count=1)

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices in the order epoch `epoch` visits them (the same on every host)."""
        if not self.shuffle:
            return np.arange(len(self.data))
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.data)))
        return self._order_cache[1]

    def batch(self, epoch: int, step: int) -> Batch:
        """This host's rows of global batch `step` of epoch `epoch`."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step={step} is not in [0, {self.steps_per_epoch})")
        n = len(self.data)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        global_index = np.where(positions < n, self.order(epoch)[np.minimum(positions, n - 1)], -1)
        real = global_index[global_index >= 0]
        length = smallest_bucket(self.data.buckets, int(self.data.lengths[real].max()))
        first = self.process_index * self.rows_per_host
        index = global_index[first : first + self.rows_per_host].astype(np.int32)
        mask = index >= 0
        input_ids = np.full((self.rows_per_host, length), self.data.pad_id, np.int32)
        input_ids[mask] = self.data.input_ids[index[mask], :length]
        seps = np.zeros((self.rows_per_host, 3), np.int32)
        seps[mask] = self.data.seps[index[mask]]
        return {"input_ids": input_ids, "seps": seps, "example_mask": mask, "index": index}

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches `start_step, ..., steps_per_epoch - 1` of epoch `epoch`."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is not in [0, {self.steps_per_epoch}]")
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)

    def __len__(self) -> int:
        return self.steps_per_epoch
