"""The training loop end to end: resume after SIGKILL, SIGTERM, NaN stop, best logic, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icot_jax.config import DEMO_CONFIG, load_config
from icot_jax.loop.state import is_new_best
from icot_jax.loop.training import train

REPO = Path(__file__).resolve().parents[1]

# A tiny from-scratch run: 2x2 multiplication, 6 epochs of 8 batches, a checkpoint every 4 batches, the
# fixed schedule and a constant LR (the demo's recipe has the adaptive one and a decay).
TINY = [
    "model.overrides={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32, n_inner: 64}",
    "data.generate_digits=2", "data.generate_train=64", "data.generate_valid=0",
    "data.max_length=32", "train.batch_size=8", "train.epochs=6", "train.pretrain_epochs=1",
    "train.lr=1e-3", "train.remove_per_epoch=4", "checkpoint.every_steps=4", "checkpoint.keep=3",
    "log_every_steps=1", "eval.every_epochs=1", "train.warmup_steps=0", "train.keep_position=false",
    "train.schedule=fixed", "train.lr_decay=none",
]
# TINY with the adaptive schedule, advancing from the first batch (no pretraining) every 3 to 6 batches,
# so that every checkpoint holds a schedule state that has moved, and the LR decaying once no CoT is left
# (so a resume must also restore where the decay started).
ADAPTIVE = [
    "train.schedule=adaptive", "train.pretrain_epochs=0", "train.adaptive_window=2", "train.adaptive_min_steps=3",
    "train.adaptive_max_steps=6", "train.adaptive_recovery=0.97", "train.adaptive_max_tokens_per_advance=2",
    "train.lr_decay=after_removal",
]


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "icot_jax.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Poll until a complete (renamed, numeric) checkpoint folder exists; return its step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        folder = run_dir / "checkpoints"
        steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
        if steps:
            return min(steps)
        if proc.poll() is not None:
            pytest.fail(f"run ended before its first checkpoint:\n{proc.stdout.read()}")
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared")


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """The steps of every ``tag`` scalar in a folder of TensorBoard event files (TFRecord framing: length,
    its CRC, an ``Event`` proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            steps += [event.step for value in event.summary.value if value.tag == tag]
            offset += 12 + length + 4
    return steps


def _final_params(run_dir: Path) -> list[np.ndarray]:
    import jax
    from flax import nnx

    from icot_jax.runs import open_run

    model = open_run(run_dir, which="latest").model
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _full_run(folder: Path, *overrides: str) -> Path:
    run_dir = folder / "run"
    proc = _cli("train", str(DEMO_CONFIG), *TINY, *overrides, f"run_dir={run_dir}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return _full_run(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def uninterrupted_adaptive(tmp_path_factory) -> Path:
    return _full_run(tmp_path_factory.mktemp("full_adaptive"), *ADAPTIVE)


# ADAPTIVE judged on the validation exact match of an evaluation every 2 batches.
ADAPTIVE_VAL = [*ADAPTIVE, "train.adaptive_signal=val_accuracy", "data.generate_valid=16", "eval.every_steps=2",
                "eval.batch_size=16"]


@pytest.fixture(scope="module")
def uninterrupted_adaptive_val(tmp_path_factory) -> Path:
    return _full_run(tmp_path_factory.mktemp("full_adaptive_val"), *ADAPTIVE_VAL)


def _advances(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "schedule_advance" in r]


@pytest.mark.parametrize("schedule", ["fixed", "adaptive", "adaptive_val"])
def test_sigkill_then_resume_is_bit_identical(schedule, request, tmp_path):
    uninterrupted = request.getfixturevalue("uninterrupted" if schedule == "fixed" else f"uninterrupted_{schedule}")
    overrides = {"fixed": [], "adaptive": ADAPTIVE, "adaptive_val": ADAPTIVE_VAL}[schedule]
    run_dir = tmp_path / "run"
    proc = _cli("train", str(DEMO_CONFIG), *TINY, *overrides, f"run_dir={run_dir}")
    _wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    resumed = _cli("train", "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    # The killed process never released its run-directory lock: the resumed one takes it over, and says
    # where it starts.
    assert f"took over the lock of pid {proc.pid} on host {socket.gethostname()}" in out
    assert f"{run_dir}: resuming from step {killed_at}\n" in out
    full, again = _final_params(uninterrupted), _final_params(run_dir)
    assert len(full) == len(again)
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a, b)
    records = list(map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
    steps = [r["step"] for r in records if "loss" in r]  # one record per batch (evaluations have their own)
    assert steps == sorted(set(steps)) == list(range(1, 49)), "metrics.jsonl must read as one run"
    # The run's clock continues from the checkpoint: logged times never go back, the total counts both pieces.
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    assert elapsed == sorted(elapsed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seconds"] > summary["seconds_this_piece"] > 0
    # Both pieces compiled their widths: the summary counts this piece's and, apart, every piece's.
    assert summary["train_step_compiles_all_pieces"] > summary["train_step_compiles"] >= 1
    # The adaptive schedule took the same decisions, from the same accuracies, before and after the kill.
    assert _advances(run_dir) == _advances(uninterrupted)
    assert (len(_advances(run_dir)) > 3) == (schedule != "fixed")
    # TensorBoard too: the killed run's unflushed points are not lost, its points after the checkpoint
    # are not doubled.
    assert sorted(_tensorboard_steps(run_dir / "tensorboard", "loss")) == steps


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("train", str(DEMO_CONFIG), *TINY, "train.epochs=200", f"run_dir={run_dir}")
    first = _wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["steps"] >= first
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == summary["steps"], "the SIGTERM checkpoint is the step the run stopped at"


def test_metrics_fields_and_outputs(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("step", "epoch", "scheduled_to_remove", "loss", "token_accuracy", "train_step_compiles",
                    "batch_width", "skipped_batches"):
            assert key in record, key
    # Batches narrow as the CoT goes; each width compiles the step once, and no other compile happens.
    widths = [r["batch_width"] for r in records]
    assert widths[0] > widths[-1] and widths == sorted(widths, reverse=True)
    assert [r["train_step_compiles"] for r in records] == [len(set(widths[:i + 1])) for i in range(len(widths))]
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["train_step_compiles"] == len(set(widths)) <= len(summary["length_buckets"]) <= 8
    assert summary["train_step_compiles_all_pieces"] == summary["train_step_compiles"]  # one piece
    assert set(widths) <= set(summary["length_buckets"]) and summary["skipped_batches"] == 0
    assert records[0]["scheduled_to_remove"] == 0 and records[-1]["scheduled_to_remove"] > 0
    for name in ("config.yaml", "curriculum.png", "summary.json", "tokenizer", "model", "tensorboard"):
        assert (uninterrupted / name).exists(), name


def test_max_len_train_skips_and_counts_batches_and_caps_the_width(tmp_path):
    # 2x2 rows are 21 tokens; the pretraining epoch removes nothing, so all its 8 batches are too long.
    config = load_config(DEMO_CONFIG, [*TINY, "train.epochs=2", "train.max_len_train=19", f"run_dir={tmp_path / 'run'}"])
    summary = train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["length_buckets"][-1] == 19 and all(r["batch_width"] <= 19 for r in records)
    assert 8 <= summary["skipped_batches"] < 16 and records[-1]["skipped_batches"] == summary["skipped_batches"]
    assert len(records) == 16 - summary["skipped_batches"]  # every trained batch logged, no skipped one


def test_evaluation_logs_val_accuracy_and_best(tmp_path):
    overrides = [o for o in TINY if not o.startswith("data.generate_valid")]
    config = load_config(DEMO_CONFIG, [*overrides, "data.generate_valid=16", "train.epochs=2",
                                       "eval.max_new_tokens=16", f"run_dir={tmp_path / 'run'}"])
    summary = train(config, progress=False)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "val_accuracy" in line]
    assert [r["step"] for r in evals] == [8, 16]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["val_ppl"] > 1.0 for r in evals)
    assert summary["best_step"] == 16  # the CoT is still being removed: every evaluation is best
    assert (tmp_path / "run" / "best" / "16").exists()
    # Every other epoch over 3 epochs: epoch 2, plus the run's final state.
    config = load_config(DEMO_CONFIG, [*overrides, "data.generate_valid=16", "train.epochs=3", "eval.every_epochs=2",
                                       "eval.max_new_tokens=16", f"run_dir={tmp_path / 'run3'}"])
    summary = train(config, progress=False)
    evals = [json.loads(line) for line in (tmp_path / "run3" / "metrics.jsonl").read_text().splitlines()
             if "val_accuracy" in line]
    assert [r["step"] for r in evals] == [16, 24] and summary["last_eval"]["step"] == 24


def test_best_rule_matches_reference():
    assert is_new_best(None, 0.1, reset=False)
    assert is_new_best(0.9, 0.1, reset=True)  # CoT still present since the last evaluation: the score was reset
    assert not is_new_best(0.9, 0.5, reset=False)
    assert not is_new_best(0.9, 0.9, reset=False)  # strictly better only
    assert is_new_best(0.9, 0.95, reset=False)


def test_position_shift_must_fit_the_position_table(tmp_path):
    config = load_config(DEMO_CONFIG, [*TINY, "train.random_position_shift=40", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"random_position_shift=40 need \d+ positions; the model has 32"):
        train(config, progress=False)


def test_resume_refuses_a_config(tmp_path):
    from icot_jax.cli import main

    with pytest.raises(SystemExit, match="--resume"):
        main(["train", "--resume", str(tmp_path), str(DEMO_CONFIG)])


def test_hosts_plan_the_global_batch_and_keep_their_rows(tmp_path):
    from icot_jax.build import build_curriculum
    from icot_jax.data.formats import read_examples
    from icot_jax.data.loader import BatchLoader
    from icot_jax.data.multiplication import write_dataset
    from icot_jax.data.tokenize import build_builtin_tokenizer, encode_examples
    from icot_jax.loop.training import plan_batch

    write_dataset(tmp_path, [2, 3], {"train": 40}, seed=0)
    data = encode_examples(read_examples(tmp_path / "train.txt").examples, build_builtin_tokenizer())
    config = load_config(DEMO_CONFIG, ["train.batch_size=8", "train.remove_per_epoch=16"])
    curriculum = build_curriculum(config, len(data))
    single = BatchLoader(data, 8, seed=3, process_index=0, process_count=1)
    hosts = [BatchLoader(data, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
    for batch_index in range(2 * single.steps_per_epoch):
        epoch, step = divmod(batch_index, single.steps_per_epoch)
        whole, _ = plan_batch(curriculum, single, single, single.batch(epoch, step), epoch, step, batch_index,
                              prev_cot_left=True)
        parts = [plan_batch(curriculum, h, h.global_view(), h.batch(epoch, step), epoch, step, batch_index,
                            prev_cot_left=True) for h in hosts]
        for plan, _ in parts:  # the same decisions on every host
            assert (plan.schedule, plan.cot_left, plan.reset_optimizer, plan.batch_length) == (
                whole.schedule, whole.cot_left, whole.reset_optimizer, whole.batch_length)
        np.testing.assert_array_equal(np.concatenate([n for _, n in parts]), whole.n_remove)


def test_export_hf_records_how_the_run_was_trained(uninterrupted, tmp_path):
    """`icot export-hf` writes icot_jax.json, so the exported folder evaluates like its run directory (here
    `join: segments`, where an HF folder without the file defaults to `reference`)."""
    from icot_jax.cli import main
    from icot_jax.runs import open_run

    out = tmp_path / "exported"
    assert main(["export-hf", str(uninterrupted), str(out)]) == 0
    run, exported = open_run(uninterrupted), open_run(out)
    assert (exported.join, exported.keep_position) == (run.join, run.keep_position) == ("segments", False)
    assert exported.removal_side == run.removal_side == "left"
    assert json.loads((out / "icot_jax.json").read_text())["source"] == str(uninterrupted.resolve())


def test_adaptive_run_logs_each_advance_and_compiles_once_per_width(uninterrupted_adaptive):
    from icot_jax.adaptive import REASONS

    records = [json.loads(line) for line in (uninterrupted_adaptive / "metrics.jsonl").read_text().splitlines()]
    advances, train_records = _advances(uninterrupted_adaptive), [r for r in records if "loss" in r]
    assert {r["schedule_advance"] for r in advances} <= set(REASONS)
    assert all(3 <= r["steps_at_count"] <= 6 for r in advances[:-1])
    # Every batch trains at the count of the last advance decided before it; the optimizer resets there.
    for record in train_records:
        earlier = [a for a in advances if a["step"] < record["step"]]
        assert record["scheduled_to_remove"] == (earlier[-1]["scheduled_to"] if earlier else 0)
        assert record["reset_optimizer"] == (bool(earlier) and earlier[-1]["step"] == record["step"] - 1)
    widths = {(r["batch_width"], r["lr_scale"] < 1) for r in train_records}  # the LR decay compiles each once more
    summary = json.loads((uninterrupted_adaptive / "summary.json").read_text())
    assert summary["train_step_compiles"] == len(widths) == train_records[-1]["train_step_compiles"]
    assert (uninterrupted_adaptive / "curriculum.png").exists()


def test_lr_decays_linearly_from_the_first_batch_without_cot(uninterrupted_adaptive, uninterrupted):
    records = [json.loads(line) for line in (uninterrupted_adaptive / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    longest = max(r["scheduled_to_remove"] for r in train_records)
    start = next(r["step"] - 1 for r in train_records if r["scheduled_to_remove"] == longest)  # its batch index
    assert 0 < start < 40, "the tiny run must reach the end of its CoT well before its last batch"
    total = train_records[-1]["step"]
    expected = [1.0 if r["step"] - 1 < start else (total - r["step"] + 1) / (total - start) for r in train_records]
    np.testing.assert_allclose([r["lr_scale"] for r in train_records], expected)
    assert expected[-1] == 1 / (total - start)
    assert all("lr_scale" not in r for r in map(json.loads, (uninterrupted / "metrics.jsonl").read_text().splitlines()))


def test_adaptive_schedule_can_follow_the_answer_alone(tmp_path):
    """``train.adaptive_signal: answer_token_accuracy``: the step logs the answer's token accuracy and each
    advance is judged on the running mean of it, not of the accuracy over every target."""
    run_dir = _full_run(tmp_path, *ADAPTIVE, "train.adaptive_signal=answer_token_accuracy", "train.epochs=3")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = {r["step"]: r for r in records if "loss" in r}
    assert all("answer_token_accuracy" in r for r in train_records.values())
    recovered = [a for a in _advances(run_dir) if a["schedule_advance"] == "recovered" and a["scheduled_from"] > 0]
    assert recovered, "the tiny run must advance on a recovery at least once"
    for advance in recovered:  # window 2, every batch logged: the advance's batch and the one before
        window = [train_records[advance["step"] - k] for k in (1, 0)]
        assert advance["accuracy_mean"] == pytest.approx(np.mean([r["answer_token_accuracy"] for r in window]))


def test_adaptive_schedule_can_follow_validation_exact_match(uninterrupted_adaptive_val):
    """``train.adaptive_signal: val_accuracy``: the rule reads the validation exact match of the evaluations
    (every 2 batches here), decides right after them, and the mean it records is that of the last two."""
    run_dir = uninterrupted_adaptive_val
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_accuracy"] for r in records if "val_accuracy" in r}
    assert sorted(evals) == list(range(2, 49, 2))
    advances = _advances(run_dir)
    recovered = [a for a in advances if a["schedule_advance"] == "recovered" and a["scheduled_from"] > 0]
    assert recovered, "the tiny run must advance on a recovery at least once"
    for advance in recovered:  # window 2: the evaluation after the advance's batch and the one before
        assert advance["step"] in evals
        assert advance["accuracy_mean"] == pytest.approx(np.mean([evals[advance["step"] - k] for k in (2, 0)]))
    # Without a reading between evaluations, only max_steps may advance the count off an evaluation step.
    assert all(a["schedule_advance"] == "max_steps" for a in advances if a["step"] not in evals)
