"""bench/summarize_runs.py reads a run directory's metrics.jsonl into the rows docs/RESULTS.md quotes."""

import json

import pytest
import yaml

from conftest import bench_module


@pytest.fixture(scope="module")
def summarize_runs():
    """bench/summarize_runs.py as a module."""
    with bench_module("summarize_runs") as module:
        yield module


def train_record(step, scheduled, cot_left, remove_all=False, accuracy=0.9):
    return {"step": step, "epoch": 0, "scheduled_to_remove": scheduled, "remove_all": remove_all,
            "reset_optimizer": False, "loss": 0.1, "token_accuracy": accuracy, "mean_cot_left": cot_left,
            "train_step_compiles": 1, "elapsed_s": step / 10}


def eval_record(step, accuracy, minutes=None, generated=5.0):
    record = {"step": step, "epoch": 0, "val_accuracy": accuracy, "val_mean_generated_tokens": generated}
    return record if minutes is None else {**record, "elapsed_s": 60 * minutes}


@pytest.fixture
def run(tmp_path):
    """A stopped run: four evaluations, the schedule advancing between them, CoT gone by the last."""
    records = [train_record(1, 0, 6.0), eval_record(10, 0.2, minutes=1),
               train_record(11, 2, 4.0), eval_record(20, 0.5, minutes=4),
               train_record(21, 4, 2.0), eval_record(30, 0.7, minutes=6),
               train_record(31, 6, 0.0, remove_all=True), eval_record(40, 0.9, minutes=12, generated=3.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"mode": "icot"}}))
    return tmp_path


def test_timeline_pairs_each_evaluation_with_the_schedule_before_it(summarize_runs, run):
    rows = summarize_runs.timeline(run)
    assert [(r["step"], r["scheduled"], r["cot_left"], r["val_accuracy"]) for r in rows] == [
        (10, 0, 6.0, 0.2), (20, 2, 4.0, 0.5), (30, 4, 2.0, 0.7), (40, "all", 0.0, 0.9)]
    assert [r["minutes"] for r in rows] == [1, 4, 6, 12]
    assert rows[-1]["generated_tokens"] == 3.0


def test_timeline_thins_to_one_row_per_interval_and_keeps_the_last(summarize_runs, run):
    assert [r["step"] for r in summarize_runs.timeline(run, every_minutes=4)] == [10, 30, 40]
    assert [r["step"] for r in summarize_runs.timeline(run, every_minutes=100)] == [10, 40]


def test_summary_of_a_stopped_run(summarize_runs, run):
    row = summarize_runs.summarize(run)
    assert row["run"].endswith("(stopped)") and row["steps"] == 31
    assert row["final_val_accuracy"] == 0.9 and row["max_val_accuracy"] == 0.9 and row["cot_left"] == 0.0
