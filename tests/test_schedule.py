"""The closed-form schedule, resets and length skip against a literal transcription of the reference loop."""

import dataclasses
import math

import numpy as np
import pytest

from icot_jax.removal import REMOVE_ALL, Curriculum, Schedule, reference_batch_length, sample_offsets

EOS = 0


def make_batches(num_examples, batch_size, epochs, seed, min_cot=1):
    """Per batch, the separator positions of its real examples (the reference's last batch is short)."""
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-num_examples // batch_size)
    batches = []
    for step in range(epochs * steps_per_epoch):
        rows = batch_size if (step + 1) % steps_per_epoch else num_examples - batch_size * (steps_per_epoch - 1)
        q = rng.integers(1, 5, rows)
        cot = rng.integers(min_cot, 13, rows)
        ans = rng.integers(1, 5, rows)
        batches.append(np.stack([q, q + cot + 1, q + cot + ans + 2], axis=1).astype(np.int32))
    return batches


def reference_run(num_examples, batch_size, epochs, remove_per_epoch, pretrain_epoch, remove_start_from,
                  remove_all_when_remove_beyond, removal_smoothing_lambda, seed, batches):
    """The reference's training loop (src/train.py, left-side removal, --reset_optimizer), minus the model.

    Yields per batch: scheduled_to_remove, to_remove per example (None when the removal block is skipped),
    whether the optimizer is reset, whether all CoT was removed, and the batch length after removal (at
    the reference's current commit each row is cut at its own last EOS and the batch re-padded, so the
    length is the longest row after removal). The smoothing offsets come from our ``sample_offsets`` (the
    RNG stream is not the reference's).
    """
    steps_per_epoch = -(-num_examples // batch_size)  # len(train_dataloader)
    steps_per_removed_token = int(round(steps_per_epoch / remove_per_epoch))
    scheduled_to_remove = remove_start_from
    remove_step_counter = 0
    all_cot_removed_in_prev_batch = False
    step = 0
    for epoch in range(epochs):
        if scheduled_to_remove < float("inf"):
            scheduled_to_remove = int(round(scheduled_to_remove))
        if scheduled_to_remove >= remove_all_when_remove_beyond:
            scheduled_to_remove = float("inf")
        for _ in range(steps_per_epoch):
            prev_scheduled_to_remove = scheduled_to_remove
            if remove_step_counter == steps_per_removed_token or steps_per_removed_token == 0:
                scheduled_to_remove += 1
                remove_step_counter = 0
            if epoch >= pretrain_epoch:
                remove_step_counter += 1
            reset = False
            if scheduled_to_remove > prev_scheduled_to_remove:
                if not all_cot_removed_in_prev_batch:
                    reset = True
            if scheduled_to_remove >= remove_all_when_remove_beyond:
                scheduled_to_remove = float("inf")
            seps = batches[step]
            rows = len(seps)
            lengths = seps[:, 2] + 1
            to_remove = None
            cut_lengths = list(lengths)
            all_cot_removed_in_batch = False
            if scheduled_to_remove > 0 or removal_smoothing_lambda != float("inf"):
                offsets = sample_offsets(removal_smoothing_lambda, seed=seed, step=step, batch_size=batch_size)
                to_remove = [scheduled_to_remove + int(o) for o in offsets[:rows]]
                if epoch < pretrain_epoch:
                    to_remove = [remove_start_from] * rows
                all_cot_removed_in_batch = True
                cut_lengths = []
                for b in range(rows):
                    removal_from_position = seps[b, 0] + 1
                    removal_to_position = seps[b, 0] + 1 + to_remove[b]
                    removal_from_position = max(removal_from_position, seps[b, 0] + 1)
                    if removal_to_position < seps[b, 1]:
                        all_cot_removed_in_batch = False
                    removal_to_position = min(removal_to_position, seps[b, 1])
                    cut_lengths.append(lengths[b] - (removal_to_position - removal_from_position))
            all_cot_removed_in_prev_batch = all_cot_removed_in_batch
            yield scheduled_to_remove, to_remove, reset, all_cot_removed_in_batch, max(cut_lengths)
            step += 1


CASES = [
    # num_examples, batch_size, remove_per_epoch, epochs, pretrain_epochs, remove_start_from, threshold, λ
    (64, 8, 8.0, 4, 0, 0, math.inf, math.inf),  # S = 1: one more token per batch
    (100, 8, 2.0, 6, 0, 0, math.inf, 4.0),  # E = 13, S = round(6.5) = 6 (half to even)
    (7, 3, 1.2, 8, 0, 0, math.inf, 0.7),  # E = 3, S = round(2.5) = 2, short last batch
    (90, 10, 0.5, 5, 0, 0, math.inf, math.inf),  # S = 18 spans two epochs: the counter crosses epochs
    (50, 8, 20.0, 3, 0, 0, math.inf, 4.0),  # S = round(0.35) = 0: every batch adds a token
    (50, 8, 20.0, 3, 1, 2, math.inf, 4.0),  # S = 0 during pretraining: the count still grows
    (80, 8, 4.0, 8, 2, 3, 9, 1.0),  # pretraining, start count, remove-all threshold
    (80, 8, 4.0, 3, 0, 5, 5, 4.0),  # start at the threshold: remove all from the first batch
    (50, 8, 20.0, 3, 1, 5, 5, math.inf),  # ... but pretraining keeps CoT: the count is inf, so no resets
    (400, 16, 8.0, 5, 0, 0, 39, 4.0),  # GSM8K-like: S = 3, remove-all at 39
    (33, 4, 3.0, 12, 0, 0, math.inf, 0.3),  # heavy smoothing; runs until every CoT is gone
]


@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-B{c[1]}-D{c[2]}-P{c[4]}-s{c[5]}-T{c[6]}" for c in CASES])
def test_curriculum_matches_reference_loop(case):
    num_examples, batch_size, delta, epochs, pretrain, start, threshold, lam = case
    batches = make_batches(num_examples, batch_size, epochs, seed=len(CASES))
    schedule = Schedule(num_examples, batch_size, delta, pretrain, start, threshold)
    curriculum = Curriculum(schedule, "icot", smoothing_lambda=lam, reset_optimizer=True, seed=11)
    reference = reference_run(num_examples, batch_size, epochs, delta, pretrain, start, threshold, lam, 11, batches)
    prev_cot_left, resets = True, 0
    for step, (scheduled, to_remove, reset, all_removed, length) in enumerate(reference):
        rows = len(batches[step])
        seps = np.zeros((batch_size, 3), np.int32)  # filler rows pad the short last batch
        seps[:rows] = batches[step]
        plan = curriculum.plan(step, seps, np.arange(batch_size) < rows, prev_cot_left=prev_cot_left)
        assert plan.schedule.scheduled_to_remove == scheduled, step
        expected = [0] * rows if to_remove is None else [REMOVE_ALL if math.isinf(t) else t for t in to_remove]
        assert plan.n_remove[:rows].tolist() == expected, step
        assert not plan.n_remove[rows:].any()
        assert plan.reset_optimizer == reset, step
        assert plan.cot_left == (not all_removed), step
        assert plan.batch_length == length, step
        prev_cot_left, resets = plan.cot_left, resets + reset
    assert resets > 0 or start >= threshold  # the table exercises resets except when all is gone at once


def test_batch_length_is_the_longest_row_after_removal():
    # The minimal case: rows [10,7,11,12,13,14,7,15,7] and [10,7,7,15,7] (EOS = 7), 4 removed.
    seps = np.array([[1, 6, 8], [1, 2, 4]], np.int32)
    assert reference_batch_length(seps, np.array([4, 4], np.int32), np.ones(2, bool)) == 5
    assert reference_batch_length(seps, np.array([4, 4], np.int32), np.array([False, True])) == 5
    assert reference_batch_length(seps, np.array([0, 0], np.int32), np.array([True, False])) == 9
    assert reference_batch_length(seps, np.array([0, 0], np.int32), np.zeros(2, bool)) == 0


def test_max_len_train_skips_batches_longer_after_removal():
    schedule = Schedule(num_examples=8, batch_size=2, remove_per_epoch=4)  # S = 1: one more token per batch
    curriculum = Curriculum(schedule, smoothing_lambda=math.inf, max_len_train=7)
    seps = np.array([[1, 6, 8], [1, 2, 4]], np.int32)
    plans = [curriculum.plan(step, seps, np.ones(2, bool)) for step in range(4)]
    assert [p.batch_length for p in plans] == [9, 8, 7, 6]
    assert [p.skip for p in plans] == [True, True, False, False]
    assert not any(Curriculum(schedule).plan(step, seps, np.ones(2, bool)).skip for step in range(4))
    with pytest.raises(ValueError, match="max_len_train"):
        Curriculum(schedule, max_len_train=0)


def test_schedule_is_closed_form_at_any_step():
    schedule = Schedule(num_examples=808_000, batch_size=32, remove_per_epoch=8)
    assert schedule.steps_per_epoch == 25_250 and schedule.steps_per_removed_token == 3156
    state = schedule.at(10**12)  # a loop from 0 would never return
    assert state.scheduled_to_remove == 10**12 // 3156 and state.epoch == 10**12 // 25_250
    assert schedule.at(3155).scheduled_to_remove == 0 and not schedule.at(3155).advanced
    assert schedule.at(3156).scheduled_to_remove == 1 and schedule.at(3156).advanced


def test_explicit_and_no_cot_modes():
    schedule = Schedule(num_examples=16, batch_size=4, remove_per_epoch=4, pretrain_epochs=1)
    seps = np.array([[2, 6, 9]] * 4, np.int32)
    for step in range(12):
        explicit = Curriculum(schedule, "explicit", smoothing_lambda=0.5).plan(step, seps, np.ones(4, bool))
        no_cot = Curriculum(schedule, "no_cot", smoothing_lambda=0.5).plan(step, seps, np.ones(4, bool))
        assert not explicit.n_remove.any() and explicit.cot_left and not explicit.reset_optimizer
        assert (no_cot.n_remove == REMOVE_ALL).all() and not no_cot.cot_left and not no_cot.reset_optimizer
        assert no_cot.batch_length == 10 - 3 and explicit.batch_length == 10


def test_evaluation_counts_are_the_schedule_without_smoothing():
    schedule = Schedule(num_examples=40, batch_size=4, remove_per_epoch=2, remove_all_when_remove_beyond=3)
    curriculum = Curriculum(schedule, "icot", smoothing_lambda=0.1, seed=3)
    assert curriculum.eval_n_remove(9, 6).tolist() == [1] * 6
    assert curriculum.n_remove(9, 6).tolist() != [1] * 6
    assert curriculum.eval_n_remove(15, 2).tolist() == [REMOVE_ALL] * 2
    assert Curriculum(schedule, "explicit").eval_n_remove(15, 2).tolist() == [0, 0]
    # During pretraining the reference trains with remove_start_from but evaluates its scheduled count.
    pretraining = Curriculum(Schedule(40, 4, remove_per_epoch=40, pretrain_epochs=1, remove_start_from=2))
    assert pretraining.n_remove(3, 2).tolist() == [2, 2] and pretraining.eval_n_remove(3, 2).tolist() == [6, 6]


def test_reset_can_be_disabled():
    schedule = Schedule(num_examples=8, batch_size=4, remove_per_epoch=2)
    seps = np.array([[2, 9, 11]] * 4, np.int32)
    with_resets = Curriculum(schedule, reset_optimizer=True)
    assert with_resets.plan(1, seps, np.ones(4, bool)).reset_optimizer
    assert not dataclasses.replace(with_resets, reset_optimizer=False).plan(1, seps, np.ones(4, bool)).reset_optimizer
    assert not with_resets.plan(1, seps, np.ones(4, bool), prev_cot_left=False).reset_optimizer


@pytest.mark.parametrize("kwargs, match", [
    (dict(remove_per_epoch=0), "remove_per_epoch"),
    (dict(remove_per_epoch=1, batch_size=0), "batch_size"),
    (dict(remove_per_epoch=1, pretrain_epochs=-1), "pretrain_epochs"),
])
def test_schedule_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**{"num_examples": 10, "batch_size": 2, **kwargs})


def test_curriculum_rejects_bad_settings():
    schedule = Schedule(num_examples=10, batch_size=2, remove_per_epoch=1)
    with pytest.raises(ValueError, match="mode"):
        Curriculum(schedule, mode="implicit")
    with pytest.raises(ValueError, match="smoothing_lambda"):
        Curriculum(schedule, smoothing_lambda=-1)
    with pytest.raises(ValueError, match="seps"):
        Curriculum(schedule).plan(0, np.zeros((2, 2), np.int32), np.ones(2, bool))
