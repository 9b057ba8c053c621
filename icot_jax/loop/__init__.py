"""The training loop: a run directory claimed and locked, batches, the periodic actions (log, evaluate,
checkpoint, preemption), divergence and resume. Entry point: :func:`icot_jax.loop.training.train`."""
