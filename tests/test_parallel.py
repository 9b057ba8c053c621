"""Meshes and sharding rules; sharded training on 8 simulated CPU devices equals the single-device run.

The 8-device checks run in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be
set before JAX starts its CPU backend) that executes this file as a script; the rest of the suite keeps
its single device. ``tests/test_multihost.py`` reuses the tiny model and batches defined here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from icot_jax import build, sharding
from icot_jax.config import MeshConfig

PAD_ID = 2  # the tiny configs' EOS id
ROWS, LENGTH, ACCUMULATE = 16, 24, 2


# ----------------------------------------------------------------------------------- shared helpers


def tiny_hf_config():
    from icot_jax.models import testing

    return testing.tiny_hf_config("gpt2")  # 2 layers, hidden 32, 4 heads, vocabulary 101, dropout 0.1


def make_model(seed: int = 0):
    from icot_jax.models import hf

    return hf.from_config(tiny_hf_config(), seed=seed)


def synthetic_batch(step: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Global batch ``step``: rows ``q EOS cot EOS answer EOS pad…`` of varied lengths, and removal counts."""
    rng = np.random.default_rng(step)
    input_ids = np.full((ROWS, LENGTH), PAD_ID, np.int32)
    seps = np.zeros((ROWS, 3), np.int32)
    for row in range(ROWS):
        lengths = rng.integers([3, 4, 2], [6, 9, 4])
        seps[row] = np.cumsum(lengths + 1) - 1
        input_ids[row, :seps[row, 2]] = rng.integers(3, 101, seps[row, 2])
        input_ids[row, seps[row]] = PAD_ID
    example_mask = np.arange(ROWS) < ROWS - 1  # one filler row, as the last batch of an epoch has
    n_remove = rng.integers(0, 9, ROWS).astype(np.int32)
    return {"input_ids": input_ids, "seps": seps, "example_mask": example_mask}, n_remove


def make_step(graphdef, setup: sharding.Setup | None, state=None):
    from icot_jax.train.step import StepConfig, TrainStep, make_optimizer

    sharded = {} if setup is None else dict(state_sharding=setup.shardings(state),
                                            batch_sharding=setup.batch_sharding)
    return TrainStep(graphdef, make_optimizer(1e-2), StepConfig(pad_id=PAD_ID, accumulate_steps=ACCUMULATE),
                     **sharded)


def single_device_losses(steps: int) -> list[float]:
    """The reference: the same training without any mesh, on the default device."""
    from icot_jax.train.step import init_train_state, make_optimizer, split_model

    graphdef, params, rest = split_model(make_model())
    state = init_train_state(params, rest, make_optimizer(1e-2), seed=0)
    step = make_step(graphdef, None)
    losses = []
    for i in range(steps):
        state, metrics = step(state, *synthetic_batch(i))
        losses.append(float(metrics["loss"]))
    return losses


# ---------------------------------------------------------------------------- single-device tests


def test_mesh_shape_fills_the_free_axis():
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 16) == (2, 4, 2)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1, dcn_data=2), 16) == (4, 2, 1)
    assert sharding.mesh_shape(MeshConfig(data=1, fsdp=8, tensor=1), 8) == (1, 8, 1)


@pytest.mark.parametrize("config, message", [
    (MeshConfig(data=-1, fsdp=-1), "at most one -1"),
    (MeshConfig(data=3, fsdp=-1), "not divisible"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices"),
    (MeshConfig(fsdp=-1, dcn_data=3), "mesh.dcn_data=3"),
    (MeshConfig(tensor=0), "mesh.tensor=0"),
])
def test_mesh_shape_errors_name_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(config, 8)


def test_mesh_spec_drops_axes_that_do_not_divide():
    mesh = AbstractMesh((2, 2, 4), sharding.MESH_AXES)
    assert sharding.mesh_spec(("vocab", "embed"), (32000, 4096), mesh) == P("tensor", "fsdp")
    # GPT-2's 50257-token vocabulary is not divisible by tensor=4: replicated along it.
    assert sharding.mesh_spec(("vocab", "embed"), (50257, 768), mesh) == P(None, "fsdp")
    assert sharding.mesh_spec(("embed", "kv_heads", "head_dim"), (4096, 2, 128), mesh) == P("fsdp", None, None)
    assert sharding.mesh_spec(("norm",), (4096,), mesh) == P(None)
    assert sharding.mesh_spec(("batch", None), (8, 3), mesh, {"batch": ("data", "fsdp")}) == P(("data", "fsdp"), None)
    assert sharding.mesh_spec(("batch",), (6,), mesh, {"batch": ("data", "fsdp")}) == P("data")


def test_mesh_spec_never_reuses_a_mesh_axis():
    mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
    assert sharding.mesh_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)


def test_every_model_axis_has_a_rule():
    from icot_jax.models.common import LOGICAL_AXES

    assert set(LOGICAL_AXES) <= set(sharding.LOGICAL_RULES)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(KeyError, match="'experts' has no sharding rule"):
        sharding.mesh_spec(("experts", "embed"), (8, 64), AbstractMesh((1, 1, 1), sharding.MESH_AXES))


def test_scan_layers_reaches_the_model():
    model = build.configure_model(make_model(), MeshConfig(scan_layers=True))
    assert model.scan_layers  # tests/test_scan_layers.py checks the math


def test_initialize_distributed_needs_all_three_settings(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        sharding.initialize_distributed()


def test_single_process_without_settings_stays_local(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    assert jax.process_count() == 1


# ---------------------------------------------------------------------------------- 8 CPU devices


EXPECTED_SPECS = {  # declared rules on the tiny GPT-2 (vocab 101, hidden 32, 4 heads, mlp 128)
    (1, 2, 4): {
        "embed.embedding": P(None, "fsdp"),  # 101 is not divisible by tensor=4
        "pos_embed.embedding": P(None, "fsdp"),
        "blocks.0.attn.qkv.kernel": P("fsdp", None, "tensor", None),
        "blocks.0.attn.out.kernel": P("tensor", None, "fsdp"),
        "blocks.1.mlp.fc_in.kernel": P("fsdp", "tensor"),
        "blocks.1.mlp.fc_in.bias": P("tensor"),
        "blocks.1.mlp.fc_out.kernel": P("tensor", "fsdp"),
        "final_norm.scale": P(None),
    },
    (2, 4, 1): {
        "embed.embedding": P(None, "fsdp"),
        "blocks.0.attn.qkv.kernel": P("fsdp", None, None, None),
        "blocks.1.mlp.fc_in.kernel": P("fsdp", None),
        "final_norm.scale": P(None),
    },
}
SCANNED_SHAPES = [(1, 2, 4)]  # mesh.scan_layers: stacked parameters keep their per-layer shardings
STEPS = 3


def _dotted(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".").removesuffix(".value")


def sharded_run(data: int, fsdp: int, tensor: int, scan_layers: bool = False) -> dict:
    """Train on a (data, fsdp, tensor) mesh of the 8 devices; return losses and the parameters' specs."""
    mesh = MeshConfig(data=data, fsdp=fsdp, tensor=tensor, scan_layers=scan_layers)
    setup = sharding.setup(mesh)
    from icot_jax.train.step import make_optimizer

    graphdef, state = build.init_state(setup, lambda: build.configure_model(make_model(), mesh), make_optimizer(1e-2),
                                       seed=0)
    step = make_step(graphdef, setup, state)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, *setup.put(*synthetic_batch(i)))
        losses.append(float(metrics["loss"]))
    declared = setup.shardings(state)
    # The step's outputs keep the declared shardings (parameters, moments, everything).
    mismatched = [_dotted(path) for (path, leaf), want in
                  zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(declared))
                  if not leaf.sharding.is_equivalent_to(want, leaf.ndim)]
    params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    mu = jax.tree.leaves(state.opt_state[1][0].mu)
    return {"losses": losses, "mismatched": mismatched,
            "specs": {_dotted(path): str(leaf.sharding.spec) for path, leaf in params},
            "moments_like_params": all(m.sharding == p.sharding for m, (_, p) in zip(mu, params)),
            "compiles": step.compiles}


def sharded_pretrained_load() -> dict:
    """Load a tiny Mistral checkpoint straight into shards; compare with an unsharded load."""
    import tempfile

    from icot_jax.models import hf, testing
    from icot_jax.train.step import make_optimizer

    setup = sharding.setup(MeshConfig(data=1, fsdp=2, tensor=4))
    with tempfile.TemporaryDirectory() as folder:
        testing.save_random_hf_model(testing.tiny_hf_config("mistral"), folder)
        model, _ = build.load_pretrained(folder, setup)
        plain, _ = hf.load_pretrained(folder)
    params = jax.tree_util.tree_flatten_with_path(nnx_params(model))[0]
    declared = jax.tree.leaves(setup.shardings(nnx_params(model)))
    expected = dict(jax.tree_util.tree_flatten_with_path(nnx_params(plain))[0])
    result = {"specs": {_dotted(path): str(leaf.sharding.spec) for path, leaf in params},
              "as_declared": all(leaf.sharding == want for (_, leaf), want in zip(params, declared)),
              "values_equal": all(np.array_equal(leaf, expected[path]) for path, leaf in params)}
    _, state = build.state_from_model(setup, model, make_optimizer(1e-2), seed=0)
    result["state_as_declared"] = all(leaf.sharding == want for leaf, want in
                                      zip(jax.tree.leaves(state), jax.tree.leaves(setup.shardings(state))))
    return result


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def eight_device_worker() -> dict:
    assert jax.device_count() == 8, jax.devices()
    return {"reference": single_device_losses(STEPS), "pretrained": sharded_pretrained_load(),
            **{str(shape): sharded_run(*shape) for shape in EXPECTED_SPECS},
            **{f"scan {shape}": sharded_run(*shape, scan_layers=True) for shape in SCANNED_SHAPES}}


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__, "eight_device_worker"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", list(EXPECTED_SPECS))
def test_sharded_training_matches_single_device(eight_devices, shape):
    run = eight_devices[str(shape)]
    np.testing.assert_allclose(run["losses"], eight_devices["reference"], rtol=1e-5)
    assert run["compiles"] == 1


@pytest.mark.parametrize("shape", SCANNED_SHAPES)
def test_sharded_scanned_training_matches_single_device(eight_devices, shape):
    run = eight_devices[f"scan {shape}"]
    np.testing.assert_allclose(run["losses"], eight_devices["reference"], rtol=1e-5)
    assert run["compiles"] == 1
    assert run["specs"] == eight_devices[str(shape)]["specs"] and run["mismatched"] == []


@pytest.mark.parametrize("shape", list(EXPECTED_SPECS))
def test_parameters_follow_the_declared_rules(eight_devices, shape):
    run = eight_devices[str(shape)]
    for name, spec in EXPECTED_SPECS[shape].items():
        assert run["specs"][name] == str(spec), name
    assert run["mismatched"] == []
    assert run["moments_like_params"]


def test_pretrained_weights_load_into_their_shards(eight_devices):
    loaded = eight_devices["pretrained"]
    assert loaded["as_declared"] and loaded["values_equal"] and loaded["state_as_declared"]
    # Tiny Mistral: vocabulary 101 and 2 kv heads do not divide tensor=4; 4 query heads and mlp 64 do.
    assert loaded["specs"]["embed.embedding"] == str(P(None, "fsdp"))
    assert loaded["specs"]["blocks.0.attn.q.kernel"] == str(P("fsdp", "tensor", None))
    assert loaded["specs"]["blocks.0.attn.k.kernel"] == str(P("fsdp", None, None))
    assert loaded["specs"]["blocks.1.mlp.down.kernel"] == str(P("tensor", "fsdp"))


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
