"""``build.build_model`` builds the run's model: a pretrained ``model.hf`` folder read as it is, configured
for the mesh settings."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from icot_jax import build
from icot_jax.config import DEMO_CONFIG, load_config
from icot_jax.models import hf, testing


def test_a_pretrained_model_is_its_checkpoint_configured(tmp_path):
    testing.save_random_hf_model(testing.tiny_hf_config("gpt2"), tmp_path / "hf")
    config = load_config(DEMO_CONFIG, ["model.from_scratch=false", f"model.hf={tmp_path / 'hf'}", "mesh.remat=full"])
    model = build.build_model(config)
    plain, _ = hf.load_pretrained(tmp_path / "hf")
    assert model.remat == "full"
    got, want = nnx.state(model, nnx.Param), nnx.state(plain, nnx.Param)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
