"""Teacher-forced validation metrics (loss, token accuracy, perplexity) over a whole dataset."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from icot_jax.data.loader import BatchLoader
from icot_jax.data.tokenize import EncodedDataset
from icot_jax.removal import reference_batch_length
from icot_jax.sharding import Setup
from icot_jax.train.step import EvalStep
from icot_jax.train.widths import Widths, round_up


def teacher_forced(step: EvalStep, params: nnx.State, rest: nnx.State, data: EncodedDataset, n_remove_fn,
                   batch_size: int, *, setup: Setup | None = None, widths: Widths | None = None) -> dict:
    """Token-mean loss, token accuracy and perplexity on ``data`` with ``n_remove_fn(B)`` counts.

    Each batch runs at the smallest of ``widths`` that holds it after removal (the stored width when
    none does: evaluation never skips a batch); without ``widths``, at its length after removal rounded
    up to a multiple of 8 (one compilation per width met). Every host reads whole batches;
    with ``setup`` they are placed on its mesh (needed across hosts).
    """
    loader = BatchLoader(data, batch_size, shuffle=False, process_index=0, process_count=1)
    totals = np.zeros(3)
    for batch in loader.iter_epoch(0):
        n_remove = n_remove_fn(batch_size)
        stored = batch["input_ids"].shape[1]
        length = reference_batch_length(batch["seps"], n_remove, batch["example_mask"])
        width = min(round_up(length, 8), stored) if widths is None else widths.width_or(length, stored)
        if setup is not None:
            batch, n_remove = setup.put(batch, n_remove, whole=True)
        out = step(params, rest, batch, n_remove, width)
        totals += [float(out["loss_sum"]), float(out["n_correct"]), float(out["n_target_tokens"])]
    loss = totals[0] / max(totals[2], 1)
    return {"val_loss": float(loss), "val_token_accuracy": float(totals[1] / max(totals[2], 1)),
            "val_ppl": math.exp(min(loss, 50))}
