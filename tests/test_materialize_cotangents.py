"""``mesh.materialize_cotangents``: projection cotangents computed once on CPU, the same gradients bit for bit.

With and without it, GPT-2 and Mistral (dropout on) give identical logits, gradients and train-step
metrics; the CPU program holds one conditional per projection and the GPU/TPU lowering none that
survives compilation; the config key reaches every projection of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_parallel import make_step, synthetic_batch
from test_scan_layers import logits_and_grads, make_model

from icot_jax import build, sharding
from icot_jax.config import MeshConfig, load_config
from icot_jax.models.common import Dense, materialize_cotangent
from icot_jax.train.step import init_train_state, make_optimizer

PROJECTIONS = {"gpt2": 4, "mistral": 7}  # Dense layers per block (the tiny models have 2 blocks, tied heads)


def configured(family: str, enabled: bool):
    """``(graphdef, params, rest)`` of the tiny ``family`` model as ``sharding.setup`` prepares it."""
    model = build.configure_model(make_model(family), MeshConfig(materialize_cotangents=enabled))
    return nnx.split(model, nnx.Param, ...)


def dense_flags(graphdef, params, rest) -> set[bool]:
    model = nnx.merge(graphdef, params, rest)
    return {module.materialize_cotangent for _, module in nnx.iter_modules(model) if isinstance(module, Dense)}


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_logits_and_gradients_are_bit_identical(family):
    dropout_key = jax.random.key(3)
    plain_logits, plain_grads = logits_and_grads(*configured(family, False), dropout_key)
    logits, grads = logits_and_grads(*configured(family, True), dropout_key)
    np.testing.assert_array_equal(logits, plain_logits)
    assert jax.tree.structure(grads) == jax.tree.structure(plain_grads)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_one_train_step_gives_identical_metrics_and_parameters(family):
    results = []
    for enabled in (False, True):
        graphdef, params, rest = configured(family, enabled)
        state = init_train_state(params, rest, make_optimizer(1e-2), seed=0)
        state, metrics = make_step(graphdef, None)(state, *synthetic_batch(0))  # dropout on, 2 micro-batches
        results.append(({key: float(metrics[key]) for key in ("loss", "grad_norm")}, state.params))
    (plain_metrics, plain_params), (metrics, params) = results
    assert metrics == plain_metrics
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_the_cpu_program_holds_one_conditional_per_projection(family):
    counts = {}
    for enabled in (False, True):
        graphdef, params, rest = configured(family, enabled)
        ids = synthetic_batch(0)[0]["input_ids"]
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)

        def loss(params):
            return nnx.merge(graphdef, params, rest)(ids, positions, ids != 2).sum()

        counts[enabled] = jax.jit(jax.grad(loss)).lower(params).compile().as_text().count(" conditional(")
    assert counts == {False: 0, True: 2 * PROJECTIONS[family]}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_other_platforms_compile_the_plain_identity(platform):
    def grad(x):
        return jax.grad(lambda x: jnp.sin(materialize_cotangent(2 * x)).sum())(x)

    def plain(x):
        return jax.grad(lambda x: jnp.sin(2 * x).sum())(x)

    def lowered_ops(f):
        text = jax.jit(f).trace(jnp.ones((4, 3))).lower(lowering_platforms=(platform,)).as_text()
        # The platform choice lowers to `case` ops on constant indices (XLA folds them); count the rest.
        return sorted(line.split("=", 1)[1].split()[0] for line in text.splitlines()
                      if "= stablehlo." in line and "constant" not in line and "case" not in line)

    cpu = jax.jit(grad).trace(jnp.ones((4, 3))).lower(lowering_platforms=("cpu",)).as_text()
    assert cpu.count("stablehlo.compare") == 1  # the runtime predicate of the CPU conditional
    assert lowered_ops(grad) == lowered_ops(plain)


def test_the_config_option_reaches_every_projection():
    minimal = ["model.from_scratch=true", "data.generate_digits=2"]
    assert load_config(None, minimal).mesh.materialize_cotangents  # on by default (it changes only CPU programs)
    for enabled in (False, True):
        mesh = load_config(None, [*minimal, f"mesh.materialize_cotangents={str(enabled).lower()}"]).mesh
        graphdef, state = build.abstract_state(sharding.setup(mesh), lambda: build.configure_model(make_model("mistral"), mesh),
                                               make_optimizer(1e-3), seed=0)
        assert dense_flags(graphdef, state.params, state.rest) == {enabled}
