"""`icot train`: epochs over the loader, the curriculum, evaluation, checkpoints, logs.

The host decides everything about a batch (its rows, its removal counts, whether the optimizer resets,
whether the batch is skipped for length) from pure functions of (seed, global batch index), so a run
resumed from a checkpoint replays exactly what the uninterrupted run would have done. The device sees
one compiled train step per output width for the whole run.

:func:`train` claims the run directory and runs a :class:`TrainingRun`: one batch at a time
(:meth:`TrainingRun.train_batch`), then the periodic actions, each a small named method: log, evaluate,
checkpoint (which also pushes to the bucket), stop on preemption. Where the run stands is a frozen
:class:`~icot_jax.loop.state.LoopState`, saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from icot_jax import adaptive, sharding
from icot_jax.build import build_trainer
from icot_jax.checkpoint import RunCheckpoints
from icot_jax.config import Config
from icot_jax.data.loader import BatchLoader
from icot_jax.data.tokenize import EncodedDataset
from icot_jax.generate import DecodeSettings, GenerationEvaluator, keep_position_gaps
from icot_jax.loop.divergence import DivergenceGuard, TrainingDiverged
from icot_jax.loop.logs import MetricsLog, plot_run
from icot_jax.loop.preemption import Preemption
from icot_jax.loop.session import RunSession
from icot_jax.loop.state import LoopState, lr_scale
from icot_jax.removal import Curriculum, ScheduleState, StepPlan
from icot_jax.train.step import model_from_state
from icot_jax.train.teacher_forced import teacher_forced

__all__ = ["TrainingDiverged", "TrainingRun", "default_run_dir", "plan_batch", "train"]


def default_run_dir(config: Config) -> str:
    """``runs/<name>/<UTC timestamp>``."""
    return str(Path("runs") / config.name / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))


def plan_batch(curriculum: Curriculum, loader: BatchLoader, global_loader: BatchLoader, batch: dict,
               epoch: int, step_in_epoch: int, batch_index: int, *, prev_cot_left: bool, scheduled=None):
    """Plan a batch from the *global* batch's separators; return ``(plan, this host's n_remove)``
    (``scheduled``: the adaptive schedule's state at the batch, see :meth:`Curriculum.plan`).

    Every host plans the same global batch, so resets, skips and smoothing offsets agree across hosts;
    each then keeps the removal counts of its own rows (the loader's contiguous block).
    """
    whole = batch if global_loader is loader else global_loader.batch(epoch, step_in_epoch)
    plan = curriculum.plan(batch_index, whole["seps"], whole["example_mask"], prev_cot_left=prev_cot_left,
                           scheduled=scheduled)
    first = loader.process_index * loader.rows_per_host
    return plan, plan.n_remove[first:first + loader.rows_per_host]


def generation_metrics(evaluator, model, prefix: str, position_gap=None) -> dict:
    """Greedy-decoding exact match and speed of ``model`` (see ``icot_jax.generate``), keys prefixed."""
    result = evaluator(model, position_gap)
    return {f"{prefix}_accuracy": result.accuracy, f"{prefix}_examples_per_s": result.examples_per_second,
            f"{prefix}_mean_generated_tokens": result.mean_generated_tokens}


def train(config: Config | None, *, resume_dir: str | Path | None = None, overrides: list[str] = (),
          progress: bool = True) -> dict:
    """Run (or resume) a training run; returns its summary (also written to ``run_dir/summary.json``).

    With ``resume_dir``, the run's saved ``config.yaml`` is used (with ``overrides`` of the keys in
    :data:`icot_jax.loop.resume.RESUMABLE_KEYS`) and training continues from the newest checkpoint exactly
    as if it had never stopped. The run directory is locked against a second process; a new run whose
    setup fails leaves nothing behind. SIGTERM or a first Ctrl-C saves a checkpoint and returns with
    ``summary["interrupted"] = True``. A non-finite loss or parameter raises :class:`TrainingDiverged` after
    writing ``summary.json`` (``diverged: true``) and keeping only checkpoints known to be good.
    """
    sharding.initialize_distributed()  # before anything asks JAX about devices or processes
    url = resume_dir if resume_dir is not None else config.run_dir or default_run_dir(config)
    session = RunSession.open(url, resumed=resume_dir is not None)
    try:
        session.settle_config(config, list(overrides))
        run = TrainingRun(session, progress=progress)
        diverged = None
        try:
            while run.loop.step < run.total and not run.stopped:
                run.train_batch()
        except TrainingDiverged as error:
            diverged = error
        finally:
            run.close()
        summary = run.finish(diverged)
    except BaseException:
        session.abandon()
        raise
    finally:
        session.release()
    if diverged is not None:
        raise diverged
    return summary


@dataclasses.dataclass(frozen=True)
class Tick:
    """One batch as the periodic actions see it, once it has been trained (or skipped)."""

    plan: StepPlan
    metrics: dict | None
    """The step's metrics (device scalars until read); ``None`` for a skipped batch."""
    epoch: int
    end_of_epoch: bool
    lr_scale: float | None = None
    """The batch's LR multiplier with ``train.lr_decay`` (``None`` without a decay or for a skipped batch)."""


class TrainingRun:
    """One training run in a claimed run directory: what it trains with, where it stands (:attr:`loop`),
    and the periodic actions after each batch."""

    def __init__(self, session: RunSession, *, progress: bool = True):
        self.session, self.config, self.run = session, session.config, session.run
        self.writer = jax.process_index() == 0
        trainer = build_trainer(self.config, self.run.local)
        trainer.hf_config.save_pretrained(str(self.run.local / "model"))
        self.data, self.setup, self.graphdef = trainer.data, trainer.setup, trainer.graphdef
        self.step_fn, self.curriculum, self.widths = trainer.step, trainer.curriculum, trainer.widths
        self.loader, self.global_loader = trainer.loader, trainer.loader.global_view()
        self.state, self.rule = trainer.state, trainer.schedule_rule
        del trainer  # the train step donates the state's buffers: keep no other reference
        self.total = self.loader.steps_per_epoch * self.config.train.epochs
        self.max_cot = int(self.data.train.cot_lengths.max())
        self.checkpoints = RunCheckpoints(self.run.url, keep=self.config.checkpoint.keep)
        self.guard = DivergenceGuard(self.checkpoints, self.run.url, self.config.train.lr)
        self.loop = LoopState(adaptive=self.rule.initial() if self.rule else None)
        if session.resumed:
            self._resume()
        self._open_outputs(progress)
        self.evaluators = self._evaluators()
        self.start, self.last_plan, self.stopped = time.time(), None, False
        self.loop_before = self.loop  # the earlier pieces' training time and compilations (0 for a new run)
        session.start(self.loop.step)

    def _resume(self) -> None:
        state, meta = self.session.resume_state(self.checkpoints, self.state, self.loop.to_meta())
        self.state, self.loop = state, LoopState.from_meta(meta)
        self.guard.saved(self.checkpoints.latest_step())  # its first loss tells whether the restored state is good

    def _open_outputs(self, progress: bool) -> None:
        self.log = MetricsLog(self.run.local, resume_step=self.loop.step) if self.writer else None
        self.preemption = Preemption(self.run.url)
        self.bar = tqdm(total=self.total, initial=self.loop.step, disable=not progress or not self.writer,
                        desc=self.config.name, dynamic_ncols=True)
        self.summary = {"run_dir": self.run.url, "interrupted": False}

    def _evaluators(self) -> dict[str, GenerationEvaluator]:
        """One evaluator per split: each compiles its decoder once for the whole run."""
        decode = DecodeSettings(max_new_tokens=self.config.eval.max_new_tokens)
        splits = (("val", self.data.valid), ("test", self.data.test))
        return {name: GenerationEvaluator(self.data.tokenizer, split, batch_size=self.config.eval.batch_size,
                                          settings=decode, join=self.config.data.join, progress=False)
                for name, split in splits if split is not None}

    # -- one batch ------------------------------------------------------------------------------------

    def train_batch(self) -> None:
        """Plan the next batch, reset the optimizer if the plan says so, train on it unless the plan skips
        it, then run the periodic actions."""
        index = self.loop.step
        epoch, in_epoch = divmod(index, self.loader.steps_per_epoch)
        batch = self.loader.batch(epoch, in_epoch)
        scheduled = self.rule.at(self.loop.adaptive, index) if self.rule else None  # None: the fixed schedule
        plan, n_remove = plan_batch(self.curriculum, self.loader, self.global_loader, batch, epoch, in_epoch, index,
                                    prev_cot_left=self.loop.prev_cot_left, scheduled=scheduled)
        if plan.reset_optimizer:
            self.state = self.step_fn.reset_optimizer(self.state)
        metrics, scale = None, None
        if not plan.skip:
            scale = self._lr_scale(plan.schedule)
            width = self.widths.width(plan.batch_length)
            self.state, metrics = self.step_fn(self.state, *self.setup.put(batch, n_remove), width,
                                               lr_scale=1.0 if scale is None else scale)
        self.loop, self.last_plan = self.loop.after(plan), plan
        tick = Tick(plan, metrics, epoch, end_of_epoch=self.loop.step % self.loader.steps_per_epoch == 0,
                    lr_scale=scale)
        self.after_batch(tick)

    def _lr_scale(self, schedule: ScheduleState) -> float | None:
        """``train.lr_decay: after_removal``: this batch's LR multiplier (``None`` without a decay). The decay
        starts at the first batch scheduled to remove every CoT token; the loop state keeps that batch, so a
        resumed run decays from the same one."""
        if self.config.train.lr_decay == "none":
            return None
        self.loop = self.loop.decaying(schedule, self.max_cot)
        return lr_scale(self.loop.step, self.loop.lr_decay_from, self.total)

    def after_batch(self, tick: Tick) -> None:
        """The periodic actions, in order: read and check the metrics, log, evaluate, advance the adaptive
        schedule (after the evaluation, which it may read), checkpoint, stop."""
        tick = self._checked(tick)
        if self._log_due(tick):
            self.log_step(tick)
        self.bar.update(1)
        evaluation = self.evaluate(tick) if self._eval_due(tick) else None
        if self.rule is not None:
            self.advance_schedule(tick, evaluation)
        if self._checkpoint_due(tick):
            self.save_checkpoint()
        if self.preemption.requested:
            self.stop()

    # -- when ---------------------------------------------------------------------------------------------

    def _log_due(self, tick: Tick) -> bool:
        return tick.metrics is not None and ((self.loop.step - 1) % self.config.log_every_steps == 0
                                             or tick.end_of_epoch)

    def _eval_due(self, tick: Tick) -> bool:
        every, every_epochs = self.config.eval.every_steps, self.config.eval.every_epochs
        scheduled = tick.end_of_epoch and (tick.epoch + 1) % every_epochs == 0
        last = self.loop.step == self.total  # the run's final state is always evaluated
        return scheduled or last or bool(every and self.loop.step % every == 0)

    def _checkpoint_due(self, tick: Tick) -> bool:
        return (tick.end_of_epoch or self.loop.step % self.config.checkpoint.every_steps == 0
                or self.preemption.requested)

    def _checked(self, tick: Tick) -> Tick:
        """Read the metrics to the host (and check the loss is finite) when anything will use them, or
        when the newest checkpoint waits for a loss to be called good; otherwise leave them on the device,
        so the host runs ahead of it."""
        wanted = self._log_due(tick) or tick.end_of_epoch or self._checkpoint_due(tick) or self.guard.wants_loss
        if tick.metrics is None or not wanted:
            return tick
        return dataclasses.replace(tick, metrics=self.guard.check_loss(tick.metrics, self.loop.step - 1))

    # -- what -----------------------------------------------------------------------------------------------

    def log_step(self, tick: Tick) -> None:
        """One line of ``metrics.jsonl`` (and TensorBoard) for the batch, and the progress bar's numbers."""
        schedule = tick.plan.schedule
        scheduled = self.max_cot if schedule.remove_all else int(schedule.scheduled_to_remove)
        self._write({"step": self.loop.step, "epoch": tick.epoch, "scheduled_to_remove": scheduled,
                     "remove_all": schedule.remove_all, "reset_optimizer": tick.plan.reset_optimizer,
                     **tick.metrics, "skipped_batches": self.loop.skipped_batches,
                     **({} if tick.lr_scale is None else {"lr_scale": tick.lr_scale}),
                     "elapsed_s": self._seconds()})
        self.bar.set_postfix(loss=f"{tick.metrics['loss']:.3f}", acc=f"{tick.metrics['token_accuracy']:.3f}",
                             remove="all" if schedule.remove_all else scheduled)

    def advance_schedule(self, tick: Tick, evaluation: dict | None) -> None:
        """The adaptive schedule decides the next batch's count from this batch's ``train.adaptive_signal``:
        a training metric (token accuracy, or that of the answer alone) when it was logged (read already: no
        extra device round trip), or the validation exact match when this batch was followed by an
        evaluation (``evaluation``: its record, else ``None``); an advance gets its own ``metrics.jsonl`` line."""
        signal = self.config.train.adaptive_signal
        if signal == "val_accuracy":
            seen = evaluation.get("val_accuracy") if evaluation else None
        else:
            seen = tick.metrics[signal] if self._log_due(tick) else None
        before = self.loop.adaptive
        self.loop = dataclasses.replace(self.loop, adaptive=self.rule.observe(before, self.loop.step - 1, seen))
        record = adaptive.advance_record(before, self.loop.adaptive)
        if record is not None:
            self._write(record)

    def evaluate(self, tick: Tick) -> dict:
        """Validation after the batch: teacher forcing, generation, the best-checkpoint rule; returns the
        record it logged (``{step, epoch}`` alone without a validation split)."""
        record: dict = {"step": self.loop.step, "epoch": tick.plan.schedule.epoch}
        if self.data.valid is not None:
            record.update(self._validation())
            self.loop, new_best = self.loop.evaluated(record["val_accuracy"])
            if new_best:
                record.update(self._save_best(record))
            record["elapsed_s"] = self._seconds()  # so the accuracy can be read against training time
            self._write(record)
            self.bar.write(f"step {self.loop.step}: val_accuracy {record['val_accuracy']:.4f}")
        self.summary["last_eval"] = record
        return record

    def _validation(self) -> dict:
        """Teacher-forced and generation metrics on the validation split, with the curriculum of the last batch."""
        valid = self.data.valid
        metrics = teacher_forced(self.step_fn.eval_step, self.state.params, self.state.rest, valid,
                                 self._eval_n_remove, self.config.eval.batch_size, setup=self.setup,
                                 widths=self.widths)
        return {**metrics, **generation_metrics(self.evaluators["val"], self._eval_model(), "val", self._gaps(valid))}

    def _save_best(self, record: dict) -> dict:
        """Save the best parameters; return what to add to the record (test metrics when there is a test split)."""
        self.checkpoints.save_best(self.loop.step, self.state.params, {"step": self.loop.step, **record, "is_best": True})
        added = {"is_best": True}
        if self.data.test is not None:
            added.update(generation_metrics(self.evaluators["test"], self._eval_model(), "test",
                                            self._gaps(self.data.test)))
        return added

    def _eval_model(self):
        return model_from_state(self.graphdef, self.state)  # shares the state's arrays: used before the next step

    def _gaps(self, split: EncodedDataset):
        """keep_position: generated tokens continue at the positions they had before the removal."""
        if not self.config.train.keep_position:
            return None
        return keep_position_gaps(split, self._eval_n_remove(len(split)))

    def _eval_n_remove(self, rows: int):
        """Evaluation removal counts: the scheduled count of the last batch trained, for ``rows`` examples."""
        return self.curriculum.eval_n_remove(self.loop.step - 1, rows, self.last_plan.schedule)

    def save_checkpoint(self) -> None:
        """Save the full state and the loop state (parameters checked finite first); push small files."""
        self.guard.check_params(self.state.params, self.loop.step)
        saved = dataclasses.replace(self.loop, seconds=self._seconds(), compiles=self._compiles())
        self.checkpoints.save(self.loop.step, self.state, saved.to_meta())
        self.guard.saved(self.loop.step)
        if self.writer:
            self.run.push()  # metrics and other small files follow the checkpoints to the bucket

    def stop(self) -> None:
        """A preemption notice or Ctrl-C: the checkpoint is saved; end the run here."""
        signal_name = self.preemption.signal.name
        self.summary.update(interrupted=True, signal=signal_name)
        self.bar.write(f"{signal_name}: saved step {self.loop.step} to {self.run.url}; resume with "
                       f"`icot train --resume {self.run.url}`")
        self.stopped = True

    def _seconds(self) -> float:
        """The run's training time so far: earlier pieces (up to the checkpoint this one resumed) and this one."""
        return self.loop_before.seconds + time.time() - self.start

    def _compiles(self) -> int:
        """Train-step compilations so far: earlier pieces' (up to the checkpoint resumed) and this one's."""
        return self.loop_before.compiles + self.step_fn.compiles

    def _write(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)

    # -- the end ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Restore signal handlers, close the bar, wait for checkpoint writes, close the logs."""
        self.preemption.restore()
        self.bar.close()
        self.checkpoints.wait()
        self.checkpoints.close()
        if self.log is not None:
            self.log.close()

    def finish(self, diverged: TrainingDiverged | None) -> dict:
        """Write ``summary.json`` and ``curriculum.png`` (process 0) and return the summary."""
        plan, loop = self.last_plan, self.loop
        self.summary.update(steps=loop.step, best_accuracy=loop.best_accuracy, best_step=loop.best_step,
                            train_step_compiles=self.step_fn.compiles,
                            train_step_compiles_all_pieces=self._compiles(), length_buckets=list(self.widths.buckets),
                            expected_padding=self.widths.padding, skipped_batches=loop.skipped_batches,
                            seconds=self._seconds(), seconds_this_piece=time.time() - self.start,
                            final_remove_all=bool(plan and plan.schedule.remove_all), diverged=diverged is not None)
        if diverged is not None:
            self.summary.update(diverged_at_step=diverged.step, last_good_step=diverged.good_step)
        if self.writer:
            local = self.run.local
            (local / "summary.json").write_text(json.dumps(self.summary, indent=2))
            if (local / "metrics.jsonl").exists() and not self.summary["interrupted"]:
                plot_run(local / "metrics.jsonl", local / "curriculum.png", title=self.config.name)
            self.run.push()
        return self.summary
