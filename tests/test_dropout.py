"""Dropout masks: on CPU ``keep_mask`` computes ``jax.random.bernoulli``'s mask with unrolled threefry ops;
the masks must be the same bit for bit (training resumes and compares against runs made before)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from icot_jax.models.common import dropout, keep_mask


@pytest.mark.parametrize("p", [0.9, 0.5, 0.75, 0.123456, 1e-7, 1.0 - 1e-7])
@pytest.mark.parametrize("shape", [(32, 67, 256), (3, 4, 1, 5, 5), (7,)])
def test_the_cpu_mask_is_bernoullis(p, shape):
    for key in (jax.random.PRNGKey(3), jax.random.split(jax.random.PRNGKey(4))[1], jax.random.key(5)):
        mask = jax.jit(lambda key: keep_mask(key, p, shape))(key)
        np.testing.assert_array_equal(mask, jax.random.bernoulli(key, p, shape))


def test_dropout_keeps_and_scales_as_before():
    key, x = jax.random.PRNGKey(0), jax.random.normal(jax.random.PRNGKey(1), (4, 9, 16))
    keep = jax.random.bernoulli(key, 0.9, x.shape)
    np.testing.assert_array_equal(jax.jit(lambda k, x: dropout(x, 0.1, k))(key, x), np.where(keep, x / 0.9, 0))


def test_other_platforms_lower_jax_random():
    def lowered(platform):
        return jax.jit(lambda key: keep_mask(key, 0.9, (8, 8))).trace(jax.random.PRNGKey(0)).lower(
            lowering_platforms=(platform,)).as_text()

    cpu, tpu = lowered("cpu"), lowered("tpu")
    assert cpu.count("stablehlo.shift_left") >= 20 and "threefry" not in cpu  # the 20 rounds, unrolled here
    assert "threefry" in tpu  # jax.random's own lowering (an out-of-line threefry2x32 function)
