"""Opening a finished (or running) training run: its config, tokenizer and trained weights."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from icot_jax.checkpoint import RunCheckpoints
from icot_jax.config import load_config
from icot_jax.data.tokenize import load_tokenizer
from icot_jax.rundir import RunDir
from icot_jax.train.step import init_train_state, optimizer_for, split_model


def load_run_model(run_dir: Path | str, which: str = "best"):
    """``(model, tokenizer, config)`` of a training run, with the ``best`` or ``latest`` weights."""
    import transformers

    from icot_jax.models import hf

    run = RunDir(run_dir)
    run.pull()
    config = load_config(run.local / "config.yaml")
    tokenizer = load_tokenizer(run.local / "tokenizer")
    hf_config = transformers.AutoConfig.from_pretrained(str(run.local / "model"))
    m = config.model
    abstract = nnx.eval_shape(lambda: hf.from_config(hf_config, dtype=m.dtype, param_dtype=m.param_dtype, seed=0))
    graphdef, params, rest = split_model(abstract)
    checkpoints = RunCheckpoints(run.url, keep=config.checkpoint.keep)
    if which == "best" and checkpoints.best.latest_step() is not None:
        params, _ = checkpoints.restore_best(params)
    else:
        optimizer = optimizer_for(config.train)
        state_like = jax.eval_shape(lambda: init_train_state(params, rest, optimizer, seed=0))
        params = checkpoints.restore(state_like)[0].params
    checkpoints.close()
    return nnx.merge(graphdef, params, rest), tokenizer, config
