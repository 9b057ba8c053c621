"""Faults and recovery: two processes on one run directory, Ctrl-C, divergence and resume overrides, setup
errors, bad run directories, and the reference's best-checkpoint rule (issue 16)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from test_loop import TINY, _cli, _wait_for_checkpoint

from icot_jax.cli import main
from icot_jax.config import DEMO_CONFIG, load_config, save_config
from icot_jax.loop.divergence import DivergenceGuard, TrainingDiverged
from icot_jax.loop.lock import RunDirLocked, RunLock
from icot_jax.loop.logs import read_metrics
from icot_jax.loop.resume import read_config_history
from icot_jax.loop.preemption import Preemption
from icot_jax.loop.state import is_new_best
from icot_jax.loop.training import train
from icot_jax.removal import Curriculum, Schedule


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------------------------------ two processes, signals


def test_a_second_process_is_refused_and_ctrl_c_saves_and_prints_the_resume_command(tmp_path):
    """Two real processes on one run directory; then Ctrl-C on the first. (A lock left by a killed process
    is taken over: tests/test_loop.py::test_sigkill_then_resume_is_bit_identical.)"""
    run_dir = tmp_path / "run"
    first = _cli("train", str(DEMO_CONFIG), *TINY, "train.epochs=200", f"run_dir={run_dir}")
    try:
        _wait_for_checkpoint(run_dir, first)
        second = _cli("train", "--resume", str(run_dir), "train.epochs=300")
        out, _ = second.communicate(timeout=240)
        assert second.returncode == 1, out
        assert f"is in use by another `icot train`: pid {first.pid} on host {socket.gethostname()}" in out
        assert not read_config_history(run_dir), "the refused process changed nothing"
    finally:
        first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=240)
    assert first.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["signal"] == "SIGINT"
    assert f"SIGINT: saved step {summary['steps']} to {run_dir}; resume with `icot train --resume {run_dir}`" in out
    assert _checkpoint_steps(run_dir)[-1] == summary["steps"]
    assert (run_dir / "lock").read_text() == "", "a clean exit releases the lock"


def test_a_second_ctrl_c_aborts_at_once():
    preemption = Preemption("RUN")
    try:
        signal.raise_signal(signal.SIGINT)
        assert preemption.requested and preemption.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_lock_names_its_holder_and_is_free_again_after_release(tmp_path):
    held = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirLocked, match=rf"pid {os.getpid()} on host {re.escape(socket.gethostname())}"):
        RunLock(tmp_path).acquire()
    held.release()
    again = RunLock(tmp_path).acquire()
    assert again.stale_holder is None, "a released lock is not stale"
    again.release()


# ------------------------------------------------------------------------------------ divergence


class _FakeManager:
    def __init__(self, steps):
        self.steps = list(steps)

    def all_steps(self):
        return list(self.steps)

    def delete(self, step):
        self.steps.remove(step)


class _FakeCheckpoints:
    def __init__(self, steps):
        self.latest = _FakeManager(steps)

    def wait(self):
        pass


def test_a_checkpoint_is_good_only_once_the_loss_after_it_is_finite():
    checkpoints = _FakeCheckpoints([4, 8])
    guard = DivergenceGuard(checkpoints, "RUN", lr=1.0)
    guard.saved(4)
    assert guard.wants_loss
    guard.check_loss({"loss": np.float32(2.0)}, batch_index=4)  # computed from checkpoint 4's parameters
    assert guard.good_step == 4 and not guard.wants_loss
    guard.saved(8)  # finite parameters, but the update before it exploded
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at step 9; the last good checkpoint is step 4"):
        guard.check_loss({"loss": np.float32("nan")}, batch_index=8)
    assert checkpoints.latest.steps == [4], "the bad checkpoint is removed so that --resume starts from 4"
    with pytest.raises(TrainingDiverged, match="a parameter is not finite after step 5"):
        guard.check_params({"w": np.array([1.0, np.inf], np.float32)}, step=5)


def test_divergence_is_one_error_line_and_resumes_with_a_lower_lr(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", str(DEMO_CONFIG), *TINY, "train.epochs=1", f"run_dir={run_dir}"]) == 0
    with pytest.raises(SystemExit) as exited:
        main(["train", "--resume", str(run_dir), "train.lr=1e30", "train.epochs=2", "checkpoint.every_steps=1"])
    message = str(exited.value)
    assert message.startswith("icot train: error: training diverged: ") and "\n" not in message
    step, good = int(re.search(r"at step (\d+)", message)[1]), int(re.search(r"checkpoint is step (\d+)", message)[1])
    assert f"`icot train --resume {run_dir} train.lr=1e+29`" in message
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["diverged"], summary["diverged_at_step"], summary["last_good_step"]) == (True, step, good)
    assert _checkpoint_steps(run_dir)[-1] == good < step
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert all(math.isfinite(r["loss"]) for r in records.values())
    assert good + 1 in records, "the loss computed from the good checkpoint's parameters was finite"

    # What a resumed run may change, and what it may not.
    for key in ("data.max_length=40", "train.batch_size=4", "model.dtype=bfloat16"):
        with pytest.raises(SystemExit, match=rf"'{key.split('=')[0]}' cannot change in a resumed run"):
            main(["train", "--resume", str(run_dir), key])
    with pytest.raises(SystemExit, match="'train.warmup_steps' cannot go from or to 0"):
        main(["train", "--resume", str(run_dir), "train.warmup_steps=10"])
    assert main(["train", "--resume", str(run_dir), "train.lr=1e-3", "checkpoint.every_steps=4"]) == 0
    assert not json.loads((run_dir / "summary.json").read_text())["diverged"]
    history = read_config_history(run_dir)
    assert [h["changes"].get("train.lr", {}).get("to") for h in history] == [1e30, 1e-3]
    assert history[-1]["step"] == good


# ------------------------------------------------------------------------------------ setup errors


def test_a_failed_setup_leaves_nothing_and_overlength_names_file_line_and_key(tmp_path):
    from icot_jax.data.multiplication import format_example

    data = tmp_path / "train.txt"
    data.write_text("\n".join([format_example(12, 34), "", format_example(56, 78), format_example(1234, 5678)]) + "\n")
    config = load_config(DEMO_CONFIG, [*TINY, f"data.train={data}", f"run_dir={tmp_path / 'runs' / 'x' / 'run'}"])
    with pytest.raises(ValueError, match=rf"^{data}:4: the first of 1 of 3 examples in {data} are longer than "
                                         r"max_length=32 tokens \(longest: \d+\); .* set data.too_long=skip$"):
        train(config, progress=False)
    assert not (tmp_path / "runs").exists(), "nothing half-made is left behind"


def test_a_run_dir_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = load_config(DEMO_CONFIG, [*TINY, f"run_dir={blocker / 'run'}"])
    with pytest.raises(OSError, match=rf"^run_dir {blocker / 'run'}: cannot write {blocker / 'run'}: Not a directory"):
        train(config, progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_dir_is_named(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    config = load_config(DEMO_CONFIG, [*TINY, f"run_dir={read_only}"])
    with pytest.raises(OSError, match=rf"^run_dir {read_only}: cannot write {read_only}/lock: Permission denied"):
        train(config, progress=False)


def test_resume_without_a_checkpoint_says_it_starts_from_step_0(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(DEMO_CONFIG, [*TINY, "train.epochs=1", f"run_dir={run_dir}"]), run_dir / "config.yaml")
    assert train(None, resume_dir=run_dir, progress=False)["steps"] == 8
    assert f"{run_dir}: no checkpoint yet: starting from step 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the best checkpoint


def _best_marks(curriculum: Curriculum, cot_tokens: int, accuracies: list[float]) -> list[bool]:
    """Which end-of-epoch evaluations are the new best, with the loop's bookkeeping (one example per batch)."""
    seps = np.array([[2, 3 + cot_tokens, 5 + cot_tokens]])
    steps_per_epoch = curriculum.schedule.steps_per_epoch
    best, reset, marks = None, False, []
    for epoch, accuracy in enumerate(accuracies):
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            reset = reset or curriculum.plan(step, seps, np.array([True])).resets_best
        marks.append(is_new_best(best, accuracy, reset=reset))
        best, reset = accuracy if marks[-1] else best, False
    return marks


def test_best_checkpoint_resets_if_any_batch_of_the_epoch_had_cot():
    """The issue's minimal case: N=4, 3-token CoT, B=1, Δ=2, λ=∞. Epoch 1 removes the last CoT token midway
    (its first batches still had CoT), so the reference marks all three evaluations best; looking only at
    the last batch would keep epoch 0's model, which still uses CoT."""
    schedule = Schedule(num_examples=4, batch_size=1, remove_per_epoch=2)
    icot = Curriculum(schedule=schedule, mode="icot", smoothing_lambda=math.inf)
    assert _best_marks(icot, 3, [1.0, 0.9, 0.95]) == [True, True, True]
    # Nothing is ever removed (λ = ∞, count 0): the reference's removal code never runs, nor its reset.
    explicit = Curriculum(schedule=schedule, mode="explicit", smoothing_lambda=math.inf)
    assert _best_marks(explicit, 3, [0.5, 0.4, 0.6]) == [True, False, True]
