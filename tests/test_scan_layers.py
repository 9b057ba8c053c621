"""``mesh.scan_layers``: the blocks under one ``jax.lax.scan`` compute what the Python loop computes.

Same logits, gradients and train-step loss (dropout and remat included) for GPT-2 and Mistral with a sliding
window shorter than the sequence, the same parameter paths, one block in the compiled program, decoding
unchanged, and a clear error for models whose blocks cannot share one graph.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from test_parallel import LENGTH, PAD_ID, ROWS, make_step, synthetic_batch

from icot_jax import build, sharding
from icot_jax.config import MeshConfig
from icot_jax.models import hf, logical_axes, testing
from icot_jax.train.step import init_train_state, make_optimizer, split_model

DROPOUT = {"gpt2": {}, "mistral": {"attention_dropout": 0.1}}  # tiny GPT-2 already has dropout 0.1


def make_model(family: str, **overrides) -> nnx.Module:
    return hf.from_config(testing.tiny_hf_config(family, **{**DROPOUT[family], **overrides}), seed=0)


def configured(family: str, *, scan_layers: bool, remat: str = "none", **overrides):
    """``(graphdef, params, rest)`` of the tiny ``family`` model as ``sharding.setup`` would prepare it."""
    mesh = MeshConfig(remat=remat, scan_layers=scan_layers)
    return split_model(build.configure_model(make_model(family, **overrides), mesh))


def logits_and_grads(graphdef, params, rest, dropout_key):
    """Logits and the gradients of a fixed random projection of them, jitted (``graphdef`` is static)."""
    batch, _ = synthetic_batch(0)
    positions = np.broadcast_to(np.arange(LENGTH), (ROWS, LENGTH))
    weights = np.random.default_rng(0).normal(size=(ROWS, LENGTH, 101)).astype(np.float32)

    def objective(params):
        model = nnx.merge(graphdef, params, rest)
        logits = model(batch["input_ids"], positions, batch["input_ids"] != PAD_ID, dropout_key=dropout_key)
        return (logits * weights).sum(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("family, remat, dropout", [
    ("gpt2", "none", False), ("gpt2", "none", True), ("mistral", "none", False), ("mistral", "none", True),
    ("gpt2", "full", True), ("mistral", "dots", True),
])
def test_scanned_logits_and_gradients_equal_the_loop(family, remat, dropout):
    loop = configured(family, scan_layers=False, remat=remat)
    scan = configured(family, scan_layers=True, remat=remat)
    assert loop[0] != scan[0]  # the flag is in the graphdef
    dropout_key = jax.random.key(7) if dropout else None  # the same per-layer keys must give the same masks
    expected_logits, expected_grads = logits_and_grads(*loop, dropout_key)
    logits, grads = logits_and_grads(*scan, dropout_key)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_parameter_paths_and_values_are_unchanged():
    _, params, rest = configured("gpt2", scan_layers=False)
    _, scan_params, scan_rest = configured("gpt2", scan_layers=True, remat="dots")
    assert jax.tree.structure(scan_params) == jax.tree.structure(params)  # checkpoints and HF key maps
    assert jax.tree.structure(scan_rest) == jax.tree.structure(rest)
    for got, want in zip(jax.tree.leaves(scan_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    assert logical_axes(scan_params) == logical_axes(params)  # the same sharding rules apply


def test_the_config_option_reaches_the_model():
    mesh = MeshConfig(scan_layers=True, remat="full")
    graphdef, state = build.abstract_state(sharding.setup(mesh), lambda: build.configure_model(make_model("mistral"), mesh),
                                           make_optimizer(1e-3), seed=0)
    model = nnx.merge(graphdef, state.params, state.rest)
    assert model.scan_layers
    assert model.remat == "full"


def test_one_train_step_gives_the_same_loss_and_update():
    results = []
    for scan_layers in (False, True):
        graphdef, params, rest = configured("gpt2", scan_layers=scan_layers)
        state = init_train_state(params, rest, make_optimizer(1e-2), seed=0)
        state, metrics = make_step(graphdef, None)(state, *synthetic_batch(0))  # dropout on, 2 micro-batches
        results.append((float(metrics["loss"]), state.params))
    (loss, params), (scan_loss, scan_params) = results
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(scan_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_compiled_program_holds_one_block():
    texts = {}
    for scan_layers in (False, True):
        graphdef, params, rest = configured("gpt2", scan_layers=scan_layers, n_layer=4)
        batch, _ = synthetic_batch(0)
        positions = np.broadcast_to(np.arange(LENGTH), (ROWS, LENGTH))
        forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p, rest)(ids, positions, ids != PAD_ID))
        lowered = forward.lower(params, batch["input_ids"])
        texts[scan_layers] = lowered.as_text(), lowered.compile().as_text()
    loop_hlo, loop_compiled = texts[False]
    scan_hlo, scan_compiled = texts[True]
    assert scan_hlo.count("stablehlo.while") == 1 and "stablehlo.while" not in loop_hlo
    count_dots = re.compile(r"stablehlo\.dot_general")
    assert len(count_dots.findall(scan_hlo)) * 3 < len(count_dots.findall(loop_hlo))  # 1 block of matmuls, not 4
    assert len(scan_compiled) < len(loop_compiled)


def test_remat_stays_inside_the_scanned_block():
    graphdef, params, rest = configured("mistral", scan_layers=True, remat="full")
    batch, _ = synthetic_batch(0)
    positions = np.broadcast_to(np.arange(LENGTH), (ROWS, LENGTH))
    jaxpr = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p, rest)(batch["input_ids"], positions,
                                                                      batch["input_ids"] != PAD_ID))(params))
    assert len(re.findall(r"= scan\[", jaxpr)) == 1
    assert len(re.findall(r"= remat\w*\[", jaxpr)) == 1  # in the scanned body: one block, rematerialised


def test_decoding_with_a_cache_keeps_the_loop_and_agrees():
    graphdef, params, rest = configured("mistral", scan_layers=True)
    model = nnx.merge(graphdef, params, rest)
    ids = synthetic_batch(0)[0]["input_ids"][:2, :10]
    positions, mask = np.broadcast_to(np.arange(10), (2, 10)), np.ones((2, 10), bool)
    logits, cache = model.decode(ids, positions, mask, model.init_cache(2, 16))
    np.testing.assert_allclose(logits, model(ids, positions, mask), atol=1e-5)
    assert int(cache.index) == 10 and len(cache.keys) == 2


def test_blocks_that_differ_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx.*mesh.scan_layers: false"):
        make_model("gpt2", scale_attn_by_inverse_layer_idx=True).set_scan_layers(True)
    model = make_model("mistral")
    model.blocks[1].residual_dropout = 0.5  # a static attribute only block 1 has
    with pytest.raises(ValueError, match="block 1 of this LlamaLM differs"):
        model.set_scan_layers(True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        build.configure_model(make_model("gpt2", scale_attn_by_inverse_layer_idx=True), MeshConfig(scan_layers=True))
