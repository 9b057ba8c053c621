"""Hugging Face checkpoints in and out: round trips through transformers, sharded files, key variants,
broken checkpoints, random init, placement."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from icot_jax.models import (
    CheckpointMismatchError,
    export_pretrained,
    extend_positions,
    from_config,
    load_pretrained,
    logical_axes,
)
from icot_jax.models.testing import save_random_hf_model, tiny_hf_config

ROUND_TRIP = ["gpt2", "mistral", "phi3", "llama"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint folder), built once per module."""
    built = {}
    for name in ROUND_TRIP:
        path = tmp_path_factory.mktemp(name)
        built[name] = (save_random_hf_model(tiny_hf_config(name), path), path)
    return built


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    input_ids = rng.integers(3, 101, (2, 10))
    position_ids = np.tile(np.arange(10), (2, 1)) + np.array([[0], [40]])  # row 1 near GPT-2's 64 positions
    return input_ids, position_ids, np.ones((2, 10), bool)


def hf_logits(hf_model, batch):
    input_ids, position_ids, attention_mask = (torch.tensor(x.astype(np.int64)) for x in batch)
    with torch.no_grad():
        return hf_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask).logits.numpy()


@jax.jit
def _forward(graphdef, state, input_ids, position_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, position_ids, attention_mask)


def our_logits(model, batch):
    return np.asarray(_forward(*nnx.split(model), *(jnp.asarray(x) for x in batch)))


def reload_with_transformers(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def read_tensors(path):
    with safe_open(path / "model.safetensors", framework="flax") as f:
        return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}


def rewrite_checkpoint(source, target, tensors):
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_export_reloads_in_transformers_with_the_same_logits(checkpoints, batch, tmp_path, name):
    hf_model, path = checkpoints[name]
    model, hf_config = load_pretrained(path)
    export_pretrained(model, hf_config, tmp_path)
    reference = hf_logits(hf_model, batch)
    np.testing.assert_allclose(hf_logits(reload_with_transformers(tmp_path), batch), reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(our_logits(load_pretrained(tmp_path)[0], batch), reference, atol=1e-4, rtol=0)


def test_sharded_export_writes_an_index_both_loaders_read(checkpoints, batch, tmp_path):
    hf_model, path = checkpoints["phi3"]
    model, hf_config = load_pretrained(path)
    export_pretrained(model, hf_config, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert not (tmp_path / "model.safetensors").exists()
    reference = hf_logits(hf_model, batch)
    np.testing.assert_allclose(hf_logits(reload_with_transformers(tmp_path), batch), reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(our_logits(load_pretrained(tmp_path)[0], batch), reference, atol=1e-4, rtol=0)


def test_old_gpt2_checkpoint_layout_loads(checkpoints, batch, tmp_path):
    """The hub's openai-community/gpt2 layout: keys without 'transformer.', attention-mask buffers, and a
    duplicate of the tied lm_head."""
    hf_model, path = checkpoints["gpt2"]
    tensors = {key.removeprefix("transformer."): value for key, value in read_tensors(path).items()}
    for layer in range(2):
        tensors[f"h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    rewrite_checkpoint(path, tmp_path / "old", tensors)
    model, _ = load_pretrained(tmp_path / "old")
    np.testing.assert_allclose(our_logits(model, batch), hf_logits(hf_model, batch), atol=1e-4, rtol=0)


def test_broken_checkpoint_lists_every_problem(checkpoints, tmp_path):
    path = checkpoints["gpt2"][1]
    tensors = read_tensors(path)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    tensors["transformer.wte.weight"] = np.zeros((102, 32), np.float32)
    tensors["transformer.h.0.attn.rotary"] = np.zeros(3, np.float32)
    rewrite_checkpoint(path, tmp_path / "broken", tensors)
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained(tmp_path / "broken")
    message = str(error.value)
    assert str(tmp_path / "broken") in message
    assert "missing tensors (1):" in message and "transformer.h.1.mlp.c_fc.weight  expected shape (32, 128)" in message
    assert "unexpected tensors (1):" in message and "transformer.h.0.attn.rotary  shape (3,)" in message
    assert "shape mismatches (1):" in message
    assert "transformer.wte.weight  expected (101, 32), found (102, 32)  in model.safetensors" in message


def test_a_folder_without_safetensors_is_named(checkpoints, tmp_path):
    (tmp_path / "config.json").write_text((checkpoints["gpt2"][1] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no model.safetensors"):
        load_pretrained(tmp_path)


def test_unsupported_configs_say_what_is_unsupported():
    longrope = tiny_hf_config("phi3", rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 2,
                                                        long_factor=[2.0] * 2, original_max_position_embeddings=32))
    with pytest.raises(NotImplementedError, match=r"rope_type'\] = 'longrope'"):
        from_config(longrope)
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; supported: \['gpt2', 'llama'"):
        from_config(transformers.BertConfig())


def test_extended_positions_survive_export(checkpoints, tmp_path):
    model, hf_config = load_pretrained(checkpoints["gpt2"][1])
    extend_positions(model, 80)
    export_pretrained(model, hf_config, tmp_path)
    reloaded = reload_with_transformers(tmp_path)
    assert reloaded.config.n_positions == 80
    far = (np.ones((1, 10), np.int64) * 7, np.arange(68, 78)[None], np.ones((1, 10), bool))
    np.testing.assert_allclose(hf_logits(reloaded, far), our_logits(model, far), atol=1e-4, rtol=0)


def test_pure_bf16_export_round_trips_exactly(checkpoints, tmp_path):
    model, hf_config = load_pretrained(checkpoints["mistral"][1], dtype="bfloat16", param_dtype="bfloat16")
    export_pretrained(model, hf_config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded, _ = load_pretrained(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reloaded))):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_from_config_initialises_like_transformers():
    gpt2 = from_config(tiny_hf_config("gpt2"), seed=3)
    std = lambda x: float(np.std(np.asarray(x.get_value())))  # noqa: E731
    assert std(gpt2.embed.embedding) == pytest.approx(0.02, rel=0.1)
    assert std(gpt2.blocks[0].attn.qkv.kernel) == pytest.approx(0.02, rel=0.1)
    assert std(gpt2.blocks[1].mlp.fc_out.kernel) == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    np.testing.assert_array_equal(np.asarray(gpt2.blocks[0].attn_norm.scale.get_value()), 1.0)
    np.testing.assert_array_equal(np.asarray(gpt2.blocks[0].attn.qkv.bias.get_value()), 0.0)
    again = from_config(tiny_hf_config("gpt2"), seed=3)
    np.testing.assert_array_equal(np.asarray(again.embed.embedding.get_value()),
                                  np.asarray(gpt2.embed.embedding.get_value()))
    other = from_config(tiny_hf_config("gpt2"), seed=4)
    assert np.abs(np.asarray(other.embed.embedding.get_value() - gpt2.embed.embedding.get_value())).max() > 0

    embedding = np.asarray(from_config(tiny_hf_config("phi3")).embed.embedding.get_value())
    assert not embedding[0].any() and embedding[1].any()  # the padding_idx row is zero, as in torch


def test_parameters_land_in_the_requested_shardings(checkpoints):
    """A pytree of NamedShardings from the logical axes (what icot_jax.sharding builds) or a callable."""
    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor", "vocab": "tensor"}
    path = checkpoints["mistral"][1]
    abstract = nnx.eval_shape(lambda: from_config(tiny_hf_config("mistral")))
    specs = jax.tree.map(lambda spec: jax.P(*(rules.get(name) for name in spec)), logical_axes(abstract))
    shardings = jax.tree.map(lambda spec: jax.NamedSharding(mesh, spec), specs)
    model, _ = load_pretrained(path, shardings=shardings)
    placed = nnx.state(model, nnx.Param)
    for value, expected in zip(jax.tree.leaves(placed), jax.tree.leaves(shardings)):
        assert value.sharding == expected
    assert placed["blocks"][0]["mlp"]["gate"]["kernel"].get_value().sharding.spec == jax.P("fsdp", "tensor")

    replicated = jax.NamedSharding(mesh, jax.P())
    model, _ = load_pretrained(path, shardings=lambda param_path, aval: replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    initialised = from_config(tiny_hf_config("mistral"), shardings=shardings)
    assert initialised.embed.embedding.get_value().sharding == shardings["embed"]["embedding"]
