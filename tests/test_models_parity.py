"""Our NNX models compute what transformers' PyTorch models compute (tiny random configs, CPU, fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from icot_jax.models import extend_positions, load_pretrained, logical_axes
from icot_jax.models.common import LOGICAL_AXES
from icot_jax.models.testing import TINY_CONFIGS, save_random_hf_model, tiny_hf_config

BATCH, LENGTH = 3, 12
LENGTHS = np.array([12, 9, 5])  # right padding


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint folder), built once per module."""
    built = {}
    for name in TINY_CONFIGS:
        path = tmp_path_factory.mktemp(name)
        built[name] = (save_random_hf_model(tiny_hf_config(name), path), path)
    return built


@pytest.fixture(scope="module")
def batch():
    """Right-padded random tokens; row 1's positions jump by 5 mid-sequence (as with keep_position)."""
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, 101, (BATCH, LENGTH))
    attention_mask = np.arange(LENGTH)[None] < LENGTHS[:, None]
    input_ids = np.where(attention_mask, input_ids, 2)
    position_ids = np.tile(np.arange(LENGTH), (BATCH, 1))
    position_ids[1, 4:] += 5
    return input_ids, position_ids, attention_mask


def hf_logits(hf_model, batch):
    input_ids, position_ids, attention_mask = batch
    with torch.no_grad():
        # An explicit attention mask also keeps transformers 5.x from reading the position jump as packing.
        return hf_model(input_ids=torch.tensor(input_ids), position_ids=torch.tensor(position_ids),
                        attention_mask=torch.tensor(attention_mask.astype(np.int64))).logits.numpy()


@jax.jit
def _forward(graphdef, state, input_ids, position_ids, attention_mask, dropout_key):
    return nnx.merge(graphdef, state)(input_ids, position_ids, attention_mask, dropout_key=dropout_key)


def our_logits(model, batch, dropout_key=None):
    """Jitted forward: one compilation per model beats op-by-op dispatch on this CPU."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, *(jnp.asarray(x) for x in batch), dropout_key))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_match_transformers(checkpoints, batch, name):
    hf_model, path = checkpoints[name]
    model, _ = load_pretrained(path)
    ours = our_logits(model, batch)
    assert ours.dtype == np.float32 and ours.shape == (BATCH, LENGTH, 101)
    real = batch[2]  # padding positions are compared nowhere: their outputs are unused by design
    np.testing.assert_allclose(ours[real], hf_logits(hf_model, batch)[real], atol=1e-4, rtol=0)


def test_sliding_window_is_in_effect(checkpoints, batch):
    """The Mistral parity test covers the window: without it, positions past the window change."""
    model, _ = load_pretrained(checkpoints["mistral"][1])
    window = model.config.sliding_window
    unwindowed = nnx.clone(model)
    unwindowed.config = dataclasses.replace(model.config, sliding_window=None)
    diff = np.abs(our_logits(model, batch) - our_logits(unwindowed, batch))
    assert diff[0, :window].max() < 1e-6
    assert diff[0, window:].min(axis=-1).max() > 1e-4


@pytest.mark.parametrize("name", ["gpt2", "phi3"])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["bf16-compute", "pure-bf16"])
def test_bf16_modes_are_finite_and_close(checkpoints, batch, name, param_dtype):
    path = checkpoints[name][1]
    reference = our_logits(load_pretrained(path)[0], batch)
    model, _ = load_pretrained(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(param_dtype)}
    logits = our_logits(model, batch)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    real = batch[2]
    assert np.abs(logits - reference)[real].max() < 0.05 * np.abs(reference).max()


def test_dropout_uses_the_key(checkpoints, batch):
    model, _ = load_pretrained(checkpoints["gpt2"][1])  # GPT-2: embd/attn/resid dropout 0.1
    evaluation = our_logits(model, batch)
    first = our_logits(model, batch, dropout_key=jax.random.key(1))
    assert np.abs(first - evaluation).max() > 1e-2
    np.testing.assert_array_equal(first, our_logits(model, batch, dropout_key=jax.random.key(1)))
    assert np.abs(first - our_logits(model, batch, dropout_key=jax.random.key(2))).max() > 1e-2


def test_zero_dropout_ignores_the_key(checkpoints, batch):
    model, _ = load_pretrained(checkpoints["phi3"][1])  # attention and residual dropout 0
    np.testing.assert_array_equal(our_logits(model, batch), our_logits(model, batch, dropout_key=jax.random.key(0)))


def test_padding_idx_row_gets_no_gradient_from_lookups(checkpoints, batch):
    """As torch's nn.Embedding(padding_idx=pad_token_id): Phi-3's pad row (0 here) is frozen on input."""
    model, _ = load_pretrained(checkpoints["phi3"][1])
    input_ids, position_ids, attention_mask = (jnp.asarray(x) for x in batch)
    input_ids = input_ids.at[:, 1].set(0)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        return nnx.merge(graphdef, params)(input_ids, position_ids, attention_mask).mean()

    grad = jax.jit(jax.grad(loss))(params)["embed"]["embedding"].get_value()
    assert np.abs(grad[0]).max() == 0
    assert np.abs(grad[input_ids[0, 0]]).max() > 0


@pytest.mark.parametrize("name", ["gpt2", "phi3"])
def test_every_parameter_has_logical_axes(checkpoints, name):
    model, _ = load_pretrained(checkpoints[name][1])
    axes = logical_axes(model)
    params = nnx.state(model, nnx.Param)
    for spec, value in zip(jax.tree.leaves(axes), jax.tree.leaves(params)):
        assert len(spec) == value.ndim and set(spec) <= set(LOGICAL_AXES) | {None}
    assert axes["embed"]["embedding"] == jax.P("vocab", "embed")
    assert axes["blocks"][0]["mlp_norm"]["scale"] == jax.P("norm")


def test_extend_positions_copies_the_last_row(checkpoints, batch):
    model, _ = load_pretrained(checkpoints["gpt2"][1])
    before = our_logits(model, batch)
    params = nnx.state(model, nnx.Param)
    extended_params = extend_positions(params, 80)
    assert params["pos_embed"]["embedding"].get_value().shape == (64, 32)  # the input state is untouched

    extend_positions(model, 80)
    table = np.asarray(model.pos_embed.embedding.get_value())
    np.testing.assert_array_equal(table, np.asarray(extended_params["pos_embed"]["embedding"].get_value()))
    assert table.shape == (80, 32) and model.config.n_positions == 80
    np.testing.assert_array_equal(table[64:], np.broadcast_to(table[63], (16, 32)))
    np.testing.assert_array_equal(our_logits(model, batch), before)
    far = (batch[0], batch[1] + 60, batch[2])  # positions up to 76
    assert np.isfinite(our_logits(model, far)).all()
