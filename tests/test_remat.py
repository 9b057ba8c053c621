"""``model.set_remat(policy)`` (``mesh.remat``) moves memory and compute, never the math.

Same loss and gradients with and without rematerialisation (dropout on) for GPT-2 and Mistral, one
``remat`` per block in the traced program, the same parameter paths, decoding with a KV cache untouched, the
policy carried by the graphdef, and a clear error for an unknown policy. ``tests/test_scan_layers.py``
checks remat together with ``scan_layers``.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

from icot_jax.models import hf, testing
from icot_jax.train.step import split_model
from test_parallel import LENGTH, PAD_ID, ROWS, synthetic_batch

REMAT_CALL = re.compile(r"= remat\w*\[")  # jax.checkpoint's primitive in a jaxpr


def make_model(family: str = "gpt2") -> nnx.Module:
    return hf.from_config(testing.tiny_hf_config(family), seed=0)  # 2 blocks


def objective(params, graphdef, rest):
    """A fixed random projection of the logits, with dropout on (``graphdef`` is static)."""
    batch, _ = synthetic_batch(0)
    positions = np.broadcast_to(np.arange(LENGTH), (ROWS, LENGTH))
    weights = np.random.default_rng(0).normal(size=(ROWS, LENGTH, 101)).astype(np.float32)
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["input_ids"], positions, batch["input_ids"] != PAD_ID, dropout_key=jax.random.key(1))
    return (logits * weights).sum()


@pytest.mark.parametrize("family, policy", [("gpt2", "full"), ("gpt2", "dots"), ("mistral", "full")])
def test_remat_changes_memory_not_math(family, policy):
    graphdef, params, rest = split_model(make_model(family))
    remat_graphdef, remat_params, remat_rest = split_model(make_model(family).set_remat(policy))
    assert jax.tree.structure(remat_params) == jax.tree.structure(params)  # same paths: checkpoints load
    assert jax.tree.structure(remat_rest) == jax.tree.structure(rest)
    assert remat_graphdef != graphdef  # the policy travels in the graphdef

    grad = jax.value_and_grad(objective)
    expected, got = grad(params, graphdef, rest), grad(params, remat_graphdef, rest)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    assert jax.tree.structure(got[1]) == jax.tree.structure(expected[1])
    for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)  # recomputation fuses differently

    forward = jax.make_jaxpr(objective, static_argnums=1)
    assert len(REMAT_CALL.findall(str(forward(params, remat_graphdef, rest)))) == 2  # one per block
    assert not REMAT_CALL.search(str(forward(params, graphdef, rest)))


def test_the_policy_survives_split_and_merge_and_can_be_turned_off():
    model = make_model("mistral").set_remat("dots")
    graphdef, params, rest = split_model(model)
    assert nnx.merge(graphdef, params, rest).remat == "dots"
    off_graphdef, _, _ = split_model(model.set_remat("none"))
    assert not REMAT_CALL.search(str(jax.make_jaxpr(objective, static_argnums=1)(params, off_graphdef, rest)))


def test_decoding_with_a_cache_is_not_rematerialised():
    model = make_model("mistral").set_remat("full")
    ids = synthetic_batch(0)[0]["input_ids"][:2, :10]
    positions, mask = np.broadcast_to(np.arange(10), (2, 10)), np.ones((2, 10), bool)
    cache = model.init_cache(2, 16)
    jaxpr = str(jax.make_jaxpr(lambda ids: model.decode(ids, positions, mask, cache))(ids))
    assert not REMAT_CALL.search(jaxpr)
    logits, _ = model.decode(ids, positions, mask, cache)
    np.testing.assert_allclose(logits, model(ids, positions, mask), atol=1e-5)


def test_unknown_remat_policy_names_the_key():
    with pytest.raises(ValueError, match="mesh.remat='some'; expected none, full, dots"):
        make_model().set_remat("some")
