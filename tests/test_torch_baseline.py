"""The PyTorch baseline (bench/torch_baseline.py): its host-side removal matches ours, and it trains on our plan."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import bench_module
from icot_jax.config import from_dict
from icot_jax.data.multiplication import make_example
from icot_jax.data.tokenize import encode_examples
from icot_jax.removal import REMOVE_ALL, post_removal_lengths, remove_cot

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def baseline():
    """bench/torch_baseline.py as a module."""
    with bench_module("torch_baseline") as module:
        yield module


def test_rows_are_cut_at_their_own_last_eos(baseline):
    """The issue's minimal case: the batch is as wide as its longest row after removal (5), not 9."""
    ids = np.array([[10, 7, 11, 12, 13, 14, 7, 15, 7], [10, 7, 7, 15, 7, 7, 7, 7, 7]])
    seps = np.array([[1, 6, 8], [1, 2, 4]])
    out = baseline.remove_and_repad(ids, seps, np.array([4, 4]), np.array([True, True]), pad_id=7)
    np.testing.assert_array_equal(out.input_ids, [[10, 7, 7, 15, 7], [10, 7, 7, 15, 7]])
    np.testing.assert_array_equal(out.labels, [[-100, -100, 7, 15, 7], [-100, -100, 7, 15, 7]])
    np.testing.assert_array_equal(out.lengths, [5, 5])


@pytest.mark.parametrize("side", ["left", "right"])
def test_repadded_rows_are_remove_cot_rows_truncated(baseline, builtin_tokenizer, side):
    """Rows of different lengths and counts (none, some, more than the CoT, all) and a filler row: the
    re-padded batch is our ``remove_cot`` output cut to the longest post-removal row, with labels exactly on
    its loss mask."""
    pairs = [(12, 34), (567, 89), (1234, 5678), (9, 8), (4321, 12)]
    data = encode_examples([make_example(a, b) for a, b in pairs], builtin_tokenizer, mode="segments")
    pad = data.pad_id
    input_ids = np.concatenate([data.input_ids, np.full((1, data.input_ids.shape[1]), pad, np.int32)])
    seps = np.concatenate([data.seps, np.zeros((1, 3), np.int32)])
    real = np.array([True] * len(pairs) + [False])
    n_remove = np.array([0, 3, 10**4, REMOVE_ALL, 1, 0], np.int32)

    out = baseline.remove_and_repad(input_ids, seps, n_remove, real, pad_id=pad, side=side)
    ours = jax.tree.map(np.asarray, remove_cot(input_ids, seps, n_remove, side=side, pad_id=pad))

    lengths = post_removal_lengths(seps[real], n_remove[real])
    assert out.input_ids.shape == (real.sum(), lengths.max())
    width = out.input_ids.shape[1]
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_array_equal(out.input_ids, ours.input_ids[real][:, :width])
    assert not ours.attention_mask[real][:, width:].any()  # nothing real is cut off
    target = out.labels != baseline.IGNORE
    np.testing.assert_array_equal(target, ours.loss_mask[real][:, :width])
    np.testing.assert_array_equal(out.labels[target], out.input_ids[target])


def tiny_config(**train):
    """2×2 multiplication, a 2-layer, 32-wide GPT-2, 3 batches of 8; Δ 8 makes the plan reset the optimizer."""
    return from_dict({
        "name": "tiny-torch-baseline",
        "model": {"from_scratch": True, "family": "gpt2",
                  "overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "n_inner": 64}},
        "data": {"tokenizer": "builtin", "join": "segments", "generate_digits": 2, "generate_train": 24,
                 "generate_valid": 0, "max_length": 32},
        "train": {"batch_size": 8, "epochs": 1, "lr": 1e-3, "remove_per_epoch": 8, "removal_smoothing_lambda": 4,
                  **train},
    })


def test_torch_side_trains_on_the_planned_batches(baseline, tmp_path):
    batches, tokenizer = baseline.planned_batches(tiny_config(), tmp_path)
    assert len(batches) == 3
    resets = sum(b.plan.reset_optimizer for b in batches)
    assert resets == 3  # round(3 batches / Δ 8) = 0: one more token, and a reset, at every batch

    trained = baseline.train_torch(tiny_config(), batches, tokenizer)
    result = baseline.summarize(trained.pop("times"), batches, [1, 2]) | trained  # our side's timed steps

    assert result["steps"] == 3 and result["optimizer_resets"] == resets
    assert np.isfinite([result["loss_first_step"], result["loss_last_step"]]).all()
    assert result["mean_tokens_first_step"] == batches[0].real_tokens / batches[0].examples
    assert result["mean_tokens_last_step"] < result["mean_tokens_first_step"]  # the CoT shrinks
    timed = batches[1:]
    tokens_per_example = sum(b.real_tokens for b in timed) / sum(b.examples for b in timed)
    assert result["tokens_per_s"] / result["examples_per_s"] == pytest.approx(tokens_per_example)


@pytest.mark.parametrize("key, value", [("train.keep_position", True), ("model.dtype", "bfloat16"),
                                        ("train.max_len_train", 16)])
def test_unsupported_settings_are_refused_by_name(baseline, key, value):
    config = tiny_config()
    section, field = key.split(".")
    config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{field: value})})
    with pytest.raises(ValueError, match=key):
        baseline.check_supported(config)


def test_steps_are_compared_width_by_width(baseline):
    rows = baseline.by_width([24, 67, 24, 24], [10.0, 40.0, 12.0, 14.0], [11.0, 50.0, 12.0, 21.0])
    assert [(r["width"], r["steps"]) for r in rows] == [(24, 3), (67, 1)]
    assert rows[0]["jax_median_step_ms"] == 12.0 and rows[0]["torch_median_step_ms"] == 12.0
    assert rows[0]["ratio"] == pytest.approx(44.0 / 36.0)  # summed torch time over summed jax time
    assert rows[1]["ratio"] == pytest.approx(1.25)
    with pytest.raises(ValueError, match="one width and one time"):
        baseline.by_width([24], [1.0, 2.0], [1.0, 2.0])
