"""Output widths: the exact bucket choice, the automatic set for a run, and its limits."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icot_jax.data import tokenize
from icot_jax.data.loader import BatchLoader
from icot_jax.data.multiplication import generate_splits, make_example
from icot_jax.removal import Curriculum, Schedule
from icot_jax.train.widths import Widths, choose_buckets, plan_widths, round_up


def padding(buckets, lengths):
    return sum(min(b for b in buckets if b >= n) - n for n in lengths)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=25), extra=st.integers(0, 20),
       max_buckets=st.integers(1, 4), multiple=st.sampled_from([1, 4, 8]))
def test_choose_buckets_is_the_exhaustive_optimum(lengths, extra, max_buckets, multiple):
    widest = max(lengths) + extra
    chosen = choose_buckets(lengths, widest, max_buckets=max_buckets, multiple=multiple)
    assert len(chosen) <= max_buckets and chosen[-1] == widest and list(chosen) == sorted(set(chosen))
    assert all(b % multiple == 0 for b in chosen[:-1])
    rounded = [min(round_up(n, multiple), widest) for n in lengths]
    values = sorted(set(rounded) - {widest})
    best = min(padding({*subset, widest}, rounded)
               for r in range(max_buckets) for subset in itertools.combinations(values, r))
    assert padding(chosen, rounded) == best


def test_widths_pick_the_smallest_bucket_and_name_the_fix_when_none_holds():
    widths = Widths((16, 24, 40))
    assert [widths.width(n) for n in (1, 16, 17, 40)] == [16, 16, 24, 40]
    assert widths.width_or(41, 64) == 64 and widths.width_or(20, 64) == 24
    with pytest.raises(ValueError, match="train.length_buckets"):
        widths.width(41)
    with pytest.raises(ValueError, match="increasing"):
        Widths((24, 16))


@pytest.fixture(scope="module")
def data(builtin_tokenizer):
    """200 4x4 examples (67 tokens, 46 of them CoT) stored at width 67."""
    pairs = generate_splits([4], {"train": 200}, seed=0)["train"]
    return tokenize.encode_examples([make_example(a, b) for a, b in pairs], builtin_tokenizer, mode="segments")


def curriculum_for(data, mode="icot", delta=40.0, **kwargs):
    schedule = Schedule(num_examples=len(data), batch_size=8, remove_per_epoch=delta)
    return Curriculum(schedule, mode, smoothing_lambda=4.0, **kwargs)


def loader_for(data):
    return BatchLoader(data, 8, seed=1, process_index=0, process_count=1)


def test_automatic_widths_follow_the_curriculum_within_15_percent_padding(data):
    assert data.input_ids.shape[1] == 67 and int(data.cot_lengths.max()) == 46
    loader = loader_for(data)
    widths = plan_widths(curriculum_for(data), loader, 2 * loader.steps_per_epoch)  # the whole CoT goes
    assert len(widths.buckets) <= 8 and widths.buckets[-1] == 67 and widths.buckets[0] <= 24
    assert all(b % 8 == 0 for b in widths.buckets[:-1])
    assert widths.padding < 0.15
    explicit = plan_widths(curriculum_for(data, "explicit"), loader, 50)
    no_cot = plan_widths(curriculum_for(data, "no_cot"), loader, 50)
    assert explicit.buckets == (67,) and no_cot.buckets == (24,)  # 67 - 46 = 21, rounded up to 8s


def test_max_len_train_is_the_widest_width_and_user_buckets_are_capped(data):
    loader = loader_for(data)
    capped = plan_widths(curriculum_for(data, max_len_train=50), loader, 2 * loader.steps_per_epoch)
    assert capped.buckets[-1] == 50
    fixed = plan_widths(curriculum_for(data), loader, 20, buckets=[32, 64, 128])
    assert fixed.buckets == (32, 64, 67) and fixed.padding is not None and not math.isnan(fixed.padding)
    padded_to_128 = plan_widths(curriculum_for(data), loader, 2 * loader.steps_per_epoch, multiple=128)
    assert padded_to_128.buckets == (67,)  # 128 is wider than any stored row
