"""In-graph CoT removal against a literal per-example transcription of the reference, and the offsets."""

import functools
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icot_jax.removal import (OFFSET_SUPPORT, REMOVE_ALL, offset_distribution, post_removal_lengths, remove_cot,
                              removed_counts, sample_offsets)

EOS = 0
IGNORE = -100
ROWS, LENGTH = 4, 24

jit_remove_cot = jax.jit(remove_cot, static_argnames=("side", "keep_position", "pad_id", "width"))


def reference_remove(tokens, seps, to_remove, side, keep_position, shift_from_previous=False):
    """One example through the reference's removal loop (src/train.py), unpadded.

    ``to_remove`` is ``math.inf`` for "remove all" (the reference's ``scheduled_to_remove = inf``).
    ``shift_from_previous=True`` reproduces the reference's keep_position line literally
    (``position_ids[removal_from_position - 1:] += ...``); the default is the intended behaviour.
    """
    first_sep, second_sep = seps[0], seps[1]
    labels = list(tokens)
    labels[: first_sep + 1] = [IGNORE] * (first_sep + 1)
    position_ids = list(range(len(tokens)))
    if side == "left":
        removal_from_position = first_sep + 1
        removal_to_position = first_sep + 1 + to_remove
    else:
        removal_to_position = second_sep
        removal_from_position = second_sep - to_remove
    removal_from_position = max(removal_from_position, first_sep + 1)
    removal_to_position = min(removal_to_position, second_sep)
    if keep_position:
        shift_start = removal_from_position - 1 if shift_from_previous else removal_from_position
        for i in range(shift_start, len(position_ids)):
            position_ids[i] += removal_to_position - removal_from_position
    new_tokens = tokens[:removal_from_position] + tokens[removal_to_position:]
    new_labels = labels[:removal_from_position] + labels[removal_to_position:]
    return new_tokens, new_labels, position_ids[: len(new_tokens)]


@st.composite
def examples(draw):
    """Up to ROWS examples ``q EOS cot EOS ans EOS`` padded with EOS to LENGTH, and removal counts."""
    rows, seps, n_remove = [], [], []
    for _ in range(ROWS):
        q = draw(st.integers(0, 6))
        cot = draw(st.integers(0, 9))
        ans = draw(st.integers(0, LENGTH - 3 - q - cot))
        body = draw(st.lists(st.integers(1, 9), min_size=q + cot + ans, max_size=q + cot + ans))
        tokens = body[:q] + [EOS] + body[q:q + cot] + [EOS] + body[q + cot:] + [EOS]
        rows.append(tokens + [EOS] * (LENGTH - len(tokens)))
        seps.append([q, q + cot + 1, len(tokens) - 1])
        n_remove.append(draw(st.one_of(st.integers(0, cot + 3), st.just(cot), st.just(REMOVE_ALL))))
    return np.array(rows, np.int32), np.array(seps, np.int32), np.array(n_remove, np.int32)


@settings(max_examples=60, deadline=None)
@given(batch=examples(), side=st.sampled_from(["left", "right"]), keep_position=st.booleans())
def test_remove_cot_matches_reference_loop(batch, side, keep_position):
    input_ids, seps, n_remove = batch
    out = jax.device_get(jit_remove_cot(input_ids, seps, n_remove, side=side, keep_position=keep_position,
                                        pad_id=EOS))
    for i in range(ROWS):
        real = input_ids[i, : seps[i, 2] + 1].tolist()
        to_remove = math.inf if n_remove[i] == REMOVE_ALL else int(n_remove[i])
        tokens, labels, positions = reference_remove(real, seps[i].tolist(), to_remove, side, keep_position)
        n = len(tokens)
        assert out.input_ids[i, :n].tolist() == tokens
        assert np.where(out.loss_mask[i], out.input_ids[i], IGNORE)[:n].tolist() == labels
        assert out.position_ids[i, :n].tolist() == positions
        assert out.attention_mask[i].tolist() == [True] * n + [False] * (LENGTH - n)
        assert not out.loss_mask[i, n:].any()
        assert (out.input_ids[i, n:] == EOS).all()
        assert out.seps[i].tolist() == [j for j, t in enumerate(tokens) if t == EOS]
        assert out.n_removed[i] == len(real) - n == removed_counts(seps, n_remove)[i]
        assert post_removal_lengths(seps, n_remove)[i] == n


@settings(max_examples=30, deadline=None)
@given(batch=examples(), side=st.sampled_from(["left", "right"]), keep_position=st.booleans(),
       extra=st.integers(0, 3))
def test_narrower_output_width_is_the_full_width_output_cut(batch, side, keep_position, extra):
    input_ids, seps, n_remove = batch
    width = int(post_removal_lengths(seps, n_remove).max()) + extra
    kwargs = dict(side=side, keep_position=keep_position, pad_id=EOS)
    full = jax.device_get(jit_remove_cot(input_ids, seps, n_remove, **kwargs))
    cut = jax.device_get(jit_remove_cot(input_ids, seps, n_remove, width=width, **kwargs))
    common = min(width, LENGTH)  # a width past the stored length only adds padding
    for name in ("input_ids", "position_ids", "attention_mask", "loss_mask"):
        assert getattr(cut, name).shape == (ROWS, width)
        np.testing.assert_array_equal(getattr(cut, name)[:, :common], getattr(full, name)[:, :common], err_msg=name)
    assert not cut.attention_mask[:, common:].any() and not cut.loss_mask[:, common:].any()
    assert (cut.input_ids[:, common:] == EOS).all()
    np.testing.assert_array_equal(cut.seps, full.seps)
    np.testing.assert_array_equal(cut.n_removed, full.n_removed)


def test_keep_position_fixes_reference_off_by_one():
    tokens = [5, 6, EOS, 1, 2, 3, EOS, 7, EOS]  # question 5 6, CoT 1 2 3, answer 7
    seps = [2, 6, 8]
    ours = jax.device_get(jit_remove_cot(np.array([tokens], np.int32), np.array([seps], np.int32),
                                         np.array([2], np.int32), side="left", keep_position=True, pad_id=EOS))
    _, _, literal = reference_remove(tokens, seps, 2, "left", True, shift_from_previous=True)
    # Kept tokens 5 6 EOS 3 EOS 7 EOS keep their original positions 0 1 2 5 6 7 8. The reference's line
    # starts the shift one token early and moves the first EOS too (2 -> 4), next to the kept CoT at 5.
    assert ours.position_ids[0, :7].tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert literal == [0, 1, 4, 5, 6, 7, 8]


def test_worked_example_from_docs():
    # docs/method.md: "Q1 Q2 <e> C1 C2 C3 <e> A1 <e>" padded to 12, remove 2 from the left.
    ids = np.array([[11, 12, 0, 21, 22, 23, 0, 31, 0, 0, 0, 0]], np.int32)
    out = jax.device_get(jit_remove_cot(ids, np.array([[2, 6, 8]], np.int32), np.array([2], np.int32),
                                        side="left", keep_position=False, pad_id=0))
    assert out.input_ids[0].tolist() == [11, 12, 0, 23, 0, 31, 0, 0, 0, 0, 0, 0]
    assert out.position_ids[0].tolist() == list(range(12))
    assert out.attention_mask[0].astype(int).tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert out.loss_mask[0].astype(int).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert out.seps[0].tolist() == [2, 4, 6]


def test_rows_without_cot_and_filler_rows_are_safe():
    ids = np.zeros((2, 8), np.int32)
    seps = np.array([[1, 2, 4], [0, 0, 0]], np.int32)  # empty CoT; an all-zero filler row
    out = jax.device_get(jit_remove_cot(ids, seps, np.array([REMOVE_ALL, REMOVE_ALL], np.int32), side="right",
                                        keep_position=False, pad_id=0))
    assert out.n_removed.tolist() == [0, 0]
    assert out.seps.tolist() == seps.tolist()
    assert not out.loss_mask[1].any()


def test_remove_cot_rejects_unknown_side():
    with pytest.raises(ValueError, match="side"):
        remove_cot(np.zeros((1, 4), np.int32), np.array([[0, 1, 2]], np.int32), np.zeros(1, np.int32),
                   side="middle", pad_id=0)


def test_offset_distribution_values():
    probs = offset_distribution(4.0)
    assert probs.shape == (OFFSET_SUPPORT,)
    assert probs[0] == pytest.approx(0.98168, abs=1e-5) and probs[1] == pytest.approx(0.01798, abs=1e-5)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    flat = offset_distribution(0.01)  # heavy tail: the leftover mass lands on 99
    expected = (1 - math.exp(-0.01)) * np.exp(-0.01 * np.arange(OFFSET_SUPPORT))
    np.testing.assert_allclose(flat[:-1], expected[:-1], rtol=1e-12)
    assert flat[-1] == pytest.approx(expected[-1] + 1 - expected.sum(), rel=1e-12)
    assert offset_distribution(math.inf).tolist() == [1.0] + [0.0] * (OFFSET_SUPPORT - 1)
    with pytest.raises(ValueError, match="smoothing_lambda"):
        offset_distribution(-1.0)


def test_offsets_are_a_pure_function_of_seed_and_step():
    draw = functools.partial(sample_offsets, 0.5, batch_size=64)
    assert draw(seed=1, step=7).tolist() == draw(seed=1, step=7).tolist()
    assert draw(seed=1, step=7).tolist() != draw(seed=1, step=8).tolist()
    assert draw(seed=1, step=7).tolist() != draw(seed=2, step=7).tolist()
    assert draw(seed=1, step=7).dtype == np.int32
    assert not sample_offsets(math.inf, seed=1, step=7, batch_size=5).any()


def test_offsets_follow_the_distribution():
    samples = np.concatenate([sample_offsets(1.0, seed=0, step=s, batch_size=1000) for s in range(20)])
    counts = np.bincount(samples, minlength=OFFSET_SUPPORT)[:4] / len(samples)
    np.testing.assert_allclose(counts, offset_distribution(1.0)[:4], atol=0.01)
