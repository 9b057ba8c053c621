from __future__ import annotations

import numpy as np
import pytest

from icot_jax.data import tokenize
from icot_jax.data.loader import BatchLoader
from icot_jax.data.multiplication import generate_splits, make_example

N, B = 23, 4


@pytest.fixture(scope="module")
def data(builtin_tokenizer) -> tokenize.EncodedDataset:
    """23 examples of 2x2, 3x3 and 4x4 (row lengths 21, 41, 67) over buckets 24, 48, 80."""
    pairs = generate_splits([2, 3, 4], {"train": N}, seed=0)["train"]
    return tokenize.encode_examples([make_example(a, b) for a, b in pairs], builtin_tokenizer, buckets=[24, 48, 80])


def _loader(data, **kwargs) -> BatchLoader:
    kwargs = {"seed": 3, "process_index": 0, "process_count": 1} | kwargs
    return BatchLoader(data, B, **kwargs)


def _assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys() == {"input_ids", "seps", "example_mask", "index"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_have_the_contract_dtypes_and_shapes(data):
    loader = _loader(data)
    assert loader.steps_per_epoch == len(loader) == 6  # ceil(23 / 4), as in the reference
    for batch in loader.iter_epoch(0):
        assert batch["input_ids"].dtype == batch["seps"].dtype == batch["index"].dtype == np.int32
        assert batch["example_mask"].dtype == bool
        assert batch["input_ids"].shape[0] == batch["seps"].shape[0] == B and batch["seps"].shape[1] == 3


def test_rows_are_the_encoded_rows_cut_to_the_smallest_bucket_of_the_batch(data):
    lengths = set()
    for batch in _loader(data).iter_epoch(2):
        index = batch["index"][batch["example_mask"]]
        length = tokenize.smallest_bucket(data.buckets, data.lengths[index].max())
        assert batch["input_ids"].shape[1] == length
        np.testing.assert_array_equal(batch["input_ids"][batch["example_mask"]], data.input_ids[index, :length])
        np.testing.assert_array_equal(batch["seps"][batch["example_mask"]], data.seps[index])
        lengths.add(length)
    assert lengths == {48, 80}  # this epoch has batches without 4x4 rows


def test_epoch_visits_every_example_once_and_fills_the_last_batch(data):
    batches = list(_loader(data).iter_epoch(0))
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[index >= 0]) == list(range(N))
    last = batches[-1]
    assert last["example_mask"].tolist() == [True, True, True, False]
    assert last["index"][3] == -1 and last["seps"][3].tolist() == [0, 0, 0]
    assert (last["input_ids"][3] == data.pad_id).all()


def test_order_is_a_pure_function_of_seed_and_epoch(data):
    first = list(_loader(data).iter_epoch(2))
    _assert_same_batches(first, list(_loader(data).iter_epoch(2)))
    orders = {tuple(_loader(data, seed=s).order(e)) for s, e in [(3, 2), (3, 3), (4, 2)]}
    assert len(orders) == 3
    assert _loader(data, shuffle=False).order(5).tolist() == list(range(N))


@pytest.mark.parametrize("start", [0, 1, 4, 5, 6])
def test_resume_at_a_step_yields_what_the_uninterrupted_epoch_yields(data, start):
    uninterrupted = list(_loader(data).iter_epoch(7))
    loader = _loader(data)
    loader.order(0)  # a different epoch in the cache must not matter
    _assert_same_batches(list(loader.iter_epoch(7, start_step=start)), uninterrupted[start:])


def test_two_hosts_see_each_example_once_per_epoch_with_equal_shapes(data):
    hosts = [_loader(data, process_index=i, process_count=2) for i in range(2)]
    single = _loader(data)
    seen = []
    for step in range(single.steps_per_epoch):
        parts = [host.batch(4, step) for host in hosts]
        whole = single.batch(4, step)
        assert parts[0]["input_ids"].shape == parts[1]["input_ids"].shape == (B // 2, whole["input_ids"].shape[1])
        for key in parts[0]:  # host i holds rows [i * B/2, (i+1) * B/2) of the global batch
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        seen += [i for p in parts for i in p["index"] if i >= 0]
    assert sorted(seen) == list(range(N))


def test_defaults_come_from_jax_and_bad_arguments_are_rejected(data):
    loader = BatchLoader(data, B)
    assert (loader.process_index, loader.process_count) == (0, 1)
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        _loader(data, process_count=3)
    with pytest.raises(ValueError, match="process_index=2 is not in"):
        _loader(data, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_step=7"):
        next(_loader(data).iter_epoch(0, start_step=7))
