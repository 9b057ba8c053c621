"""The adaptive schedule: when it advances and why, its limits, resume, and how the curriculum uses it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from icot_jax.adaptive import AdaptiveRule, AdaptiveState, advance_record, rule_for
from icot_jax.config import DEMO_CONFIG, ConfigError, TrainConfig, load_config
from icot_jax.removal import REMOVE_ALL, Curriculum, Schedule

# 10 batches per epoch, one pretraining epoch: the count may first advance after batch 10.
SCHEDULE = Schedule(num_examples=80, batch_size=8, remove_per_epoch=1.0, pretrain_epochs=1)


def run(rule: AdaptiveRule, accuracy, steps: int, *, every: int = 1, state: AdaptiveState | None = None,
        start: int = 0) -> tuple[AdaptiveState, list[dict]]:
    """Feed ``accuracy(step, state)`` to the rule at every ``every``-th batch from ``start``; return the last
    state and the advance records."""
    state = rule.initial() if state is None else state
    records = []
    for step in range(start, steps):
        after = rule.observe(state, step, accuracy(step, state) if step % every == 0 else None)
        if (record := advance_record(state, after)) is not None:
            records.append(record)
        state = after
    return state, records


def sizes(records: list[dict]) -> list[tuple[int, int, int]]:
    """``(count before, tokens removed, steps at the count before)`` of each advance."""
    return [(r["scheduled_from"], r["scheduled_to"] - r["scheduled_from"], r["steps_at_count"]) for r in records]


def test_it_waits_min_steps_then_advances_as_soon_as_the_model_recovers():
    rule = AdaptiveRule(SCHEDULE, window=2, recovery=0.95, min_steps=4, max_steps=50)

    def accuracy(step, state):  # at each new count: 0.5 for 6 batches, then 0.9 again
        return 0.9 if state.scheduled == 0 or step - state.since >= 6 else 0.5

    state, records = run(rule, accuracy, 60)
    # Pretraining (batches 0-9) is ignored; 4 batches at count 0, then the first advance.
    assert records[0]["step"] == 14 and records[0]["accuracy_mean"] == 0.9
    # Later, the mean of the last two values reaches 0.95 * 0.9 once both are 0.9: after 8 batches.
    assert sizes(records) == [(0, 1, 4)] + [(k, 1, 8) for k in range(1, 6)]
    assert {r["schedule_advance"] for r in records} == {"recovered"} and state.reason == "recovered"


def test_without_recovery_each_count_gets_exactly_max_steps():
    rule = AdaptiveRule(SCHEDULE, window=3, recovery=0.99, min_steps=5, max_steps=12)
    _, records = run(rule, lambda step, state: 1.0 if state.scheduled == 0 else 0.9 - 3e-3 * step, 200, every=5)
    # The first window (3 values, 5 batches apart) is full after 11 batches.
    assert sizes(records)[0] == (0, 1, 11) and records[0]["schedule_advance"] == "recovered"
    assert sizes(records)[1:] == [(k, 1, 12) for k in range(1, len(records))]
    assert {r["schedule_advance"] for r in records[1:]} == {"max_steps"}
    # Forced advances keep the baseline of the last recovered one: the level at count 0.
    assert {r["baseline"] for r in records[1:]} == {1.0} and records[1]["accuracy_mean"] < 0.9


def test_immediate_recovery_doubles_the_advance_up_to_the_maximum():
    rule = AdaptiveRule(SCHEDULE, window=1, recovery=0.9, min_steps=3, max_steps=30, max_tokens_per_advance=4)
    _, records = run(rule, lambda step, state: 1.0, 28)
    assert sizes(records) == [(0, 1, 3), (1, 2, 3), (3, 4, 3), (7, 4, 3), (11, 4, 3), (15, 4, 3)]

    def slow_at_3(step, state):  # the first check at count 3 fails, the next one passes
        return 0.5 if state.scheduled == 3 and step - state.since < 3 else 1.0

    _, records = run(rule, slow_at_3, 29)
    assert sizes(records) == [(0, 1, 3), (1, 2, 3), (3, 1, 4), (4, 2, 3), (6, 4, 3), (10, 4, 3)]


def test_it_stops_at_the_longest_cot_and_at_remove_all():
    rule = AdaptiveRule(SCHEDULE, window=1, recovery=0.9, min_steps=2, max_steps=4, longest_cot=5,
                        max_tokens_per_advance=4)
    state, records = run(rule, lambda step, state: 1.0, 100)
    assert state.scheduled == 5 and records[-1]["scheduled_to"] == 5 and rule.finished(state)
    assert rule.at(state, 100).scheduled_to_remove == 5
    capped = AdaptiveRule(Schedule(80, 8, 1.0, pretrain_epochs=1, remove_all_when_remove_beyond=3), window=1,
                          min_steps=2, max_steps=4)
    state, records = run(capped, lambda step, state: 1.0, 100)
    assert state.scheduled == 3 and len(records) == 3
    at_advance = capped.at(state, state.since)
    assert at_advance.remove_all and at_advance.advanced
    assert not capped.at(state, state.since + 1).advanced


def test_schedule_state_marks_pretraining_and_the_batch_of_each_advance():
    rule = AdaptiveRule(SCHEDULE, window=1, min_steps=3, max_steps=3)
    state = rule.initial()
    assert rule.at(state, 0).pretraining and not rule.at(state, 0).advanced
    assert rule.at(state, 10).scheduled_to_remove == 0 and not rule.at(state, 10).pretraining
    state, _ = run(rule, lambda step, state: None, 13, state=state)
    assert (state.since, state.scheduled, state.reason) == (13, 1, "max_steps")
    assert rule.at(state, 13).advanced and rule.at(state, 13).epoch == 1


def test_resuming_from_a_saved_state_reproduces_every_decision():
    rule = AdaptiveRule(SCHEDULE, window=3, recovery=0.97, min_steps=4, max_steps=25, max_tokens_per_advance=2)
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.6, 1.0, 400)

    def accuracy(step, state):
        return float(noise[step])

    full, full_records = run(rule, accuracy, 400, every=2)
    half, first_records = run(rule, accuracy, 173, every=2)
    saved = json.loads(json.dumps(half.to_json()))
    resumed, later_records = run(rule, accuracy, 400, every=2, state=AdaptiveState.from_json(saved), start=173)
    assert resumed == full and first_records + later_records == full_records
    assert len(full_records) > 5


def test_curriculum_takes_the_count_from_the_given_state():
    curriculum = Curriculum(SCHEDULE, smoothing_lambda=math.inf)
    rule = AdaptiveRule(SCHEDULE, window=1, min_steps=2, max_steps=2)
    state, _ = run(rule, lambda step, state: 1.0, 16)  # advances after batches 11, 13 and 15
    seps = np.tile(np.int32([2, 9, 11]), (8, 1))  # 6 CoT tokens
    mask = np.ones(8, bool)
    at = rule.at(state, 16)
    plan = curriculum.plan(16, seps, mask, prev_cot_left=True, scheduled=at)
    assert at.scheduled_to_remove == 3 and plan.n_remove.tolist() == [3] * 8
    assert plan.reset_optimizer and plan.schedule.advanced  # the count advanced at this batch
    assert not curriculum.plan(16, seps, mask, prev_cot_left=False, scheduled=at).reset_optimizer
    assert not curriculum.plan(17, seps, mask, scheduled=rule.at(state, 17)).reset_optimizer
    assert curriculum.eval_n_remove(16, 4, at).tolist() == [3] * 4
    with pytest.raises(ValueError, match="batch 16 was given for batch 17"):
        curriculum.plan(17, seps, mask, scheduled=at)
    # Pretraining still removes exactly remove_start_from; remove-all still removes everything.
    pretraining = AdaptiveRule(Schedule(80, 8, 1.0, pretrain_epochs=1, remove_start_from=2), window=1)
    started = Curriculum(pretraining.schedule, smoothing_lambda=4.0)
    assert started.n_remove(3, 8, pretraining.at(pretraining.initial(), 3)).tolist() == [2] * 8
    everything = AdaptiveState(scheduled=7, since=20, reason="recovered")
    capped = AdaptiveRule(Schedule(80, 8, 1.0, remove_all_when_remove_beyond=7), window=1)
    assert Curriculum(capped.schedule).n_remove(25, 2, capped.at(everything, 25)).tolist() == [REMOVE_ALL] * 2
    # Other modes ignore the count, as with the fixed schedule.
    assert Curriculum(SCHEDULE, mode="no_cot").n_remove(16, 2, at).tolist() == [REMOVE_ALL] * 2
    assert Curriculum(SCHEDULE, mode="explicit").n_remove(16, 2, at).tolist() == [0, 0]


def test_bad_parameters_are_refused_when_the_config_loads(tmp_path):
    """The file and key are named at load time, before any setup."""
    config = tmp_path / "adaptive.yaml"
    config.write_text(f"base: {DEMO_CONFIG}\ntrain: {{schedule: adaptive, adaptive_min_steps: 7, adaptive_max_steps: 5}}\n")
    with pytest.raises(ConfigError, match=rf"^{config}: key 'train.adaptive_max_steps' is 5; expected >= min_steps"):
        load_config(config)
    with pytest.raises(ConfigError, match=r"key 'train.adaptive_recovery' is 1.5"):
        load_config(DEMO_CONFIG, ["train.schedule=adaptive", "train.adaptive_recovery=1.5"])
    with pytest.raises(ConfigError, match=r"'train.schedule' is 'sometimes'"):
        load_config(DEMO_CONFIG, ["train.schedule=sometimes"])
    # Validation exact match needs a validation split; a run without one is refused before it trains.
    with pytest.raises(ConfigError, match=r"key 'train.adaptive_signal' is 'val_accuracy' but the run has no "
                                          r"validation split: set 'data.valid' .* or 'data.generate_valid'"):
        load_config(DEMO_CONFIG, ["train.schedule=adaptive", "train.adaptive_signal=val_accuracy",
                                  "data.generate_valid=0"])
    assert load_config(DEMO_CONFIG, ["train.schedule=adaptive", "train.adaptive_signal=val_accuracy"])
    # The fixed schedule never reads the signal: no split is needed for it.
    assert load_config(DEMO_CONFIG, ["train.adaptive_signal=val_accuracy", "data.generate_valid=0",
                                     "train.schedule=fixed"])


def test_config_selects_the_rule():
    assert rule_for(TrainConfig(), SCHEDULE) is None
    rule = rule_for(TrainConfig(schedule="adaptive", adaptive_min_steps=7, adaptive_max_steps=9), SCHEDULE,
                    longest_cot=8)
    assert (rule.min_steps, rule.max_steps, rule.longest_cot, rule.schedule) == (7, 9, 8, SCHEDULE)
    with pytest.raises(ValueError, match="window is 0"):
        AdaptiveRule(SCHEDULE, window=0)


def test_count_spans_read_the_advances_or_the_logged_counts():
    from icot_jax.loop.logs import count_spans

    rule = AdaptiveRule(SCHEDULE, window=1, recovery=0.9, min_steps=3, max_steps=5, max_tokens_per_advance=2)
    _, records = run(rule, lambda step, state: 0.5 if state.scheduled == 3 else 1.0, 40)
    assert count_spans(records)[:4] == [(0, 3, "recovered"), (1, 3, "recovered"), (3, 5, "max_steps"),
                                       (4, 3, "recovered")]
    # A fixed run has no advance records: the counts of its training records, at their logging resolution,
    # while CoT was left.
    logged = [{"step": s, "loss": 0.0, "scheduled_to_remove": k, "mean_cot_left": left}
              for s, k, left in [(10, 0, 4), (20, 0, 4), (30, 1, 3), (40, 1, 3), (50, 2, 2), (60, 5, 0), (70, 6, 0)]]
    assert count_spans(logged) == [(0, 20, None), (1, 20, None), (2, 10, None)]


def test_the_bar_never_falls_below_the_best_level_reached():
    rule = AdaptiveRule(SCHEDULE, window=1, recovery=0.9, min_steps=3, max_steps=7)
    levels = {0: 0.9, 1: 1.0, 2: 0.95, 3: 0.88}  # 0.88 >= 0.9 * 0.95, but < 0.9 * 1.0

    _, records = run(rule, lambda step, state: levels.get(state.scheduled, 1.0), 40)
    assert sizes(records)[:4] == [(0, 1, 3), (1, 1, 3), (2, 1, 3), (3, 1, 7)]
    assert [r["baseline"] for r in records[:5]] == [None, 0.9, 1.0, 1.0, 1.0]
    assert records[3]["schedule_advance"] == "max_steps"
