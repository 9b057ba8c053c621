"""KV-cached decoding matches the full forward pass, token by token, on left-padded ragged prompts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from icot_jax.models import from_config
from icot_jax.models.testing import tiny_hf_config

PROMPT_LENGTHS = np.array([5, 3, 7])
NEW_TOKENS = 6  # 7 + 6 tokens: past the 4-token sliding window of the tiny Mistral


@pytest.fixture(scope="module")
def prompt():
    """Left-padded prompts with HF-style positions (0 at each row's first real token)."""
    width = PROMPT_LENGTHS.max()
    attention_mask = np.arange(width)[None] >= (width - PROMPT_LENGTHS)[:, None]
    input_ids = np.where(attention_mask, np.random.default_rng(0).integers(3, 101, (3, width)), 2)
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    return input_ids, position_ids, attention_mask


def build(name):
    """Graph and random parameters (N(0, 0.3²): large enough for errors to show; drawn on the host, which
    is quicker on this CPU than compiling the init)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: from_config(tiny_hf_config(name))))
    rng = np.random.default_rng(0)
    return graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), abstract)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, input_ids, position_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, position_ids, attention_mask)


@functools.partial(jax.jit, static_argnums=0)
def decode(graphdef, state, input_ids, position_ids, attention_mask, cache):
    return nnx.merge(graphdef, state).decode(input_ids, position_ids, attention_mask, cache)


@pytest.mark.parametrize("name", ["gpt2", "mistral", "phi3"])
def test_decoding_matches_full_forward(prompt, name):
    """Prefill the prompt, decode greedily one token at a time, then check every step's logits against one
    full forward pass over the final sequence (causal: position t sees exactly what step t saw)."""
    graphdef, state = build(name)
    input_ids, position_ids, attention_mask = (jnp.asarray(x) for x in prompt)
    cache = nnx.merge(graphdef, state).init_cache(3, input_ids.shape[1] + NEW_TOKENS)

    logits, cache = decode(graphdef, state, input_ids, position_ids, attention_mask, cache)
    step_logits = [logits]
    next_position = jnp.asarray(PROMPT_LENGTHS)[:, None]
    for _ in range(NEW_TOKENS):
        token = jnp.argmax(step_logits[-1][:, -1], axis=-1)[:, None]
        input_ids = jnp.concatenate([input_ids, token], axis=1)
        position_ids = jnp.concatenate([position_ids, next_position], axis=1)
        attention_mask = jnp.concatenate([attention_mask, jnp.ones_like(token, bool)], axis=1)
        logits, cache = decode(graphdef, state, token, next_position, jnp.ones_like(token, bool), cache)
        step_logits.append(logits)
        next_position = next_position + 1

    cached = np.concatenate([np.asarray(x) for x in step_logits], axis=1)
    full = np.asarray(forward(graphdef, state, input_ids, position_ids, attention_mask))
    real = np.asarray(attention_mask)
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=0)
    assert int(cache.index) == cache.max_length
    np.testing.assert_array_equal(np.asarray(cache.valid), real)


def greedy_step(graphdef, state, cache, token, position):
    logits, cache = nnx.merge(graphdef, state).decode(token, position, jnp.ones_like(token, bool), cache)
    return jnp.argmax(logits[:, 0], axis=-1)[:, None], cache


def test_decoding_compiles_once_and_runs_in_a_while_loop(prompt):
    """The cache is a fixed-shape pytree written at a traced index: one compilation serves every decode
    step, and it can be the carry of a lax.while_loop (what the batched greedy decoder builds on)."""
    graphdef, state = build("mistral")
    input_ids, position_ids, attention_mask = (jnp.asarray(x) for x in prompt)
    cache = nnx.merge(graphdef, state).init_cache(3, input_ids.shape[1] + NEW_TOKENS)
    logits, cache = decode(graphdef, state, input_ids, position_ids, attention_mask, cache)
    first_token, start = jnp.argmax(logits[:, -1], axis=-1)[:, None], jnp.asarray(PROMPT_LENGTHS)[:, None]

    step = jax.jit(greedy_step, static_argnums=0)
    token, position, looped_cache, python_tokens = first_token, start, cache, []
    for _ in range(NEW_TOKENS):
        token, looped_cache = step(graphdef, state, looped_cache, token, position)
        position = position + 1
        python_tokens.append(token)
    assert step._cache_size() == 1

    def body(carry):
        n, token, position, cache, tokens = carry
        token, cache = greedy_step(graphdef, state, cache, token, position)
        return n + 1, token, position + 1, cache, tokens.at[:, n].set(token[:, 0])

    carry = (0, first_token, start, cache, jnp.zeros((3, NEW_TOKENS), first_token.dtype))
    *_, while_tokens = jax.jit(lambda c: jax.lax.while_loop(lambda c: c[0] < NEW_TOKENS, body, c))(carry)
    np.testing.assert_array_equal(np.asarray(while_tokens), np.concatenate(python_tokens, axis=1))
