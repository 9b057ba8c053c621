"""`icot train`: epochs over the loader, the curriculum, evaluation, checkpoints, logs.

The host decides everything about a batch (its rows, its removal counts, whether the optimizer resets,
whether the batch is skipped for length) from pure functions of (seed, global batch index), so a run
resumed from a checkpoint replays exactly what the uninterrupted run would have done. The device sees
one compiled train step for the whole run.

Resume bookkeeping lives in the checkpoint's JSON ``meta``: ``batch_index`` (next global batch to run),
``prev_cot_left`` (the reset rule looks one batch back), and the best-score state.
"""

from __future__ import annotations

import datetime
import json
import math
import signal
import sys
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
from icot_jax.loop.session import RunSession
from icot_jax.removal import Curriculum
from icot_jax.train.step import TrainState, model_from_state
from icot_jax.train.teacher_forced import teacher_forced


def default_run_dir(config: Config) -> str:
    """``runs/<name>/<UTC timestamp>``."""
    return str(Path("runs") / config.name / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))


# ----------------------------------------------------------------------------------------------------
# Evaluation


def resets_best(curriculum: Curriculum, plan) -> bool:
    """Whether batch ``plan`` resets the best score, as the reference's ``train.py`` does.

    The reference resets it at *every* batch that still has CoT after removal (the flag is set inside its
    batch loop and read at the next evaluation), so an evaluation after an epoch in which any batch had
    CoT is always the new best: the model is still changing task. Its removal code, and with it the reset,
    only runs when something is scheduled or smoothing is on: a run that never removes anything (λ = ∞,
    nothing scheduled, e.g. ``train.mode: explicit``) keeps its highest accuracy.
    """
    smoothing = curriculum.mode == "icot" and not math.isinf(curriculum.smoothing_lambda)
    return plan.cot_left and (plan.schedule.scheduled_to_remove > 0 or smoothing)


def is_new_best(best_accuracy: float | None, accuracy: float, *, reset: bool) -> bool:
    """The reference's best-checkpoint rule: after a reset (:func:`resets_best` since the last evaluation)
    every accuracy is the new best; otherwise only a strictly higher one is."""
    return reset or best_accuracy is None or accuracy > best_accuracy


def generation_metrics(evaluator, model, prefix: str, position_gap=None) -> dict:
    """Greedy-decoding exact match and speed of ``model`` (see ``icot_jax.generate``), keys prefixed."""
    result = evaluator(model, position_gap)
    return {f"{prefix}_accuracy": result.accuracy, f"{prefix}_examples_per_s": result.examples_per_second,
            f"{prefix}_mean_generated_tokens": result.mean_generated_tokens}


# ----------------------------------------------------------------------------------------------------
# The loop


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


class _Preemption:
    """Turns SIGTERM (TPU preemption notice) and a first Ctrl-C (SIGINT) into a request that the loop honours
    between batches: save a checkpoint, then stop. A second Ctrl-C aborts at once, without saving."""

    def __init__(self, run_url: str):
        self.run_url = run_url
        self.signal: signal.Signals | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        """A stop was requested."""
        return self.signal is not None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            sys.stderr.write(f"\nsecond Ctrl-C: aborting without saving; `icot train --resume {self.run_url}` "
                             "continues from the newest checkpoint\n")
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)
        if signum == signal.SIGINT:
            sys.stderr.write("\nCtrl-C: saving a checkpoint after this batch, then stopping "
                             "(Ctrl-C again aborts without saving)\n")

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
        return _train(session, progress)
    except BaseException:
        session.abandon()
        raise
    finally:
        session.release()


def _train(session: RunSession, progress: bool) -> dict:
    """The body of :func:`train` in a claimed run directory."""
    run, config = session.run, session.config
    run_dir = run.local
    writer = jax.process_index() == 0
    t = config.train
    trainer = build_trainer(config, run_dir)
    trainer.hf_config.save_pretrained(str(run_dir / "model"))
    data, setup, graphdef, step_fn, state = trainer.data, trainer.setup, trainer.graphdef, trainer.step, trainer.state
    curriculum, loader, widths = trainer.curriculum, trainer.loader, trainer.widths
    del trainer  # the train step donates the state's buffers: keep no other reference
    global_loader = loader.global_view()
    total = loader.steps_per_epoch * t.epochs
    max_cot = int(data.train.cot_lengths.max())
    checkpoints = RunCheckpoints(run.url, keep=config.checkpoint.keep)
    rule = adaptive.rule_for(t, curriculum.schedule, longest_cot=max_cot)  # None: the fixed schedule
    meta = {"batch_index": 0, "prev_cot_left": True, "best_accuracy": None, "best_step": None, "best_reset": False,
            "skipped_batches": 0, "adaptive": rule.initial().to_json() if rule else None}
    guard = DivergenceGuard(checkpoints, run.url, t.lr)
    if session.resumed:
        state, meta = session.resume_state(checkpoints, state, meta)
        guard.saved(checkpoints.latest_step())  # its first loss tells whether the restored state is good
    schedule = adaptive.AdaptiveState.from_json(meta["adaptive"]) if rule else None
    log = MetricsLog(run_dir, resume_step=meta["batch_index"]) if writer else None
    preemption = _Preemption(run.url)
    bar = tqdm(total=total, initial=meta["batch_index"], disable=not progress or not writer,
               desc=config.name, dynamic_ncols=True)
    summary = {"run_dir": run.url, "interrupted": False}
    # One evaluator per split: each compiles its decoder once for the whole run.
    decode = DecodeSettings(max_new_tokens=config.eval.max_new_tokens)
    evaluators = {name: GenerationEvaluator(data.tokenizer, split, batch_size=config.eval.batch_size,
                                            settings=decode, join=config.data.join, progress=False)
                  for name, split in (("val", data.valid), ("test", data.test)) if split is not None}

    def log_record(record: dict) -> None:
        if log is not None:
            log.write(record)

    def evaluate(batch_index: int, state: TrainState, schedule_state) -> dict:
        """Validation at the end of batch ``batch_index - 1``: teacher forcing, generation, best logic."""
        record: dict = {"step": batch_index, "epoch": schedule_state.epoch}
        if data.valid is None:
            return record
        record.update(teacher_forced(step_fn.eval_step, state.params, state.rest, data.valid,
                                     lambda b: curriculum.eval_n_remove(batch_index - 1, b, schedule_state),
                                     config.eval.batch_size, setup=setup, widths=widths))
        eval_model = model_from_state(graphdef, state)

        def gaps(split: EncodedDataset):
            """keep_position: generated tokens continue at the positions they had before the removal."""
            if not config.train.keep_position:
                return None
            return keep_position_gaps(split, curriculum.eval_n_remove(batch_index - 1, len(split), schedule_state))

        record.update(generation_metrics(evaluators["val"], eval_model, "val", gaps(data.valid)))
        new_best = is_new_best(meta["best_accuracy"], record["val_accuracy"], reset=meta["best_reset"])
        meta["best_reset"] = False
        if new_best:
            meta.update(best_accuracy=record["val_accuracy"], best_step=batch_index)
            record["is_best"] = True
            checkpoints.save_best(batch_index, state.params, {"step": batch_index, **record})
            if data.test is not None:
                record.update(generation_metrics(evaluators["test"], eval_model, "test", gaps(data.test)))
        return record

    start = time.time()
    last_plan = None
    diverged: TrainingDiverged | None = None
    session.start(meta["batch_index"])
    try:
        while meta["batch_index"] < total:
            batch_index = meta["batch_index"]
            epoch, step_in_epoch = divmod(batch_index, loader.steps_per_epoch)
            batch = loader.batch(epoch, step_in_epoch)
            plan, n_remove = plan_batch(curriculum, loader, global_loader, batch, epoch, step_in_epoch,
                                        batch_index, prev_cot_left=meta["prev_cot_left"],
                                        scheduled=rule.at(schedule, batch_index) if rule else None)
            last_plan = plan
            meta["best_reset"] = meta["best_reset"] or resets_best(curriculum, plan)
            if plan.reset_optimizer:
                state = step_fn.reset_optimizer(state)
            metrics = None
            if plan.skip:
                meta["skipped_batches"] += 1
            else:
                state, metrics = step_fn(state, *setup.put(batch, n_remove), widths.width(plan.batch_length))
            meta.update(batch_index=batch_index + 1, prev_cot_left=plan.cot_left)
            end_of_epoch = meta["batch_index"] % loader.steps_per_epoch == 0
            logged = metrics is not None and (batch_index % config.log_every_steps == 0 or end_of_epoch)
            if logged or end_of_epoch or meta["batch_index"] % config.checkpoint.every_steps == 0 or guard.wants_loss:
                if metrics is not None:
                    metrics = guard.check_loss(metrics, batch_index)
            if logged:
                scheduled = max_cot if plan.schedule.remove_all else int(plan.schedule.scheduled_to_remove)
                log_record({"step": batch_index + 1, "epoch": epoch, "scheduled_to_remove": scheduled,
                            "remove_all": plan.schedule.remove_all, "reset_optimizer": plan.reset_optimizer,
                            **metrics, "skipped_batches": meta["skipped_batches"], "elapsed_s": time.time() - start})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['token_accuracy']:.3f}",
                                remove="all" if plan.schedule.remove_all else scheduled)
            if rule is not None:  # decides on the metrics read above: no extra device round trip
                before, schedule = schedule, rule.observe(schedule, batch_index,
                                                          metrics["token_accuracy"] if logged else None)
                meta["adaptive"] = schedule.to_json()
                if (record := adaptive.advance_record(before, schedule)) is not None:
                    log_record(record)
            bar.update(1)
            every = config.eval.every_steps
            scheduled_eval = end_of_epoch and (epoch + 1) % config.eval.every_epochs == 0
            last_batch = meta["batch_index"] == total  # the run's final state is always evaluated
            if scheduled_eval or last_batch or (every and meta["batch_index"] % every == 0):
                record = evaluate(meta["batch_index"], state, plan.schedule)
                if "val_accuracy" in record:
                    log_record(record)
                summary["last_eval"] = record
                if "val_accuracy" in record:
                    bar.write(f"step {meta['batch_index']}: val_accuracy {record['val_accuracy']:.4f}")
            if end_of_epoch or meta["batch_index"] % config.checkpoint.every_steps == 0 or preemption.requested:
                guard.check_params(state.params, meta["batch_index"])
                checkpoints.save(meta["batch_index"], state, dict(meta))
                guard.saved(meta["batch_index"])
                if writer:
                    run.push()  # metrics and other small files follow the checkpoints to the bucket
            if preemption.requested:
                summary.update(interrupted=True, signal=preemption.signal.name)
                bar.write(f"{preemption.signal.name}: saved step {meta['batch_index']} to {run.url}; resume with "
                          f"`icot train --resume {run.url}`")
                break
    except TrainingDiverged as error:
        diverged = error
    finally:
        preemption.restore()
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        if log is not None:
            log.close()
    summary.update(steps=meta["batch_index"], best_accuracy=meta["best_accuracy"], best_step=meta["best_step"],
                   train_step_compiles=step_fn.compiles, length_buckets=list(widths.buckets),
                   expected_padding=widths.padding, skipped_batches=meta["skipped_batches"],
                   seconds=time.time() - start,
                   final_remove_all=bool(last_plan and last_plan.schedule.remove_all), diverged=diverged is not None)
    if diverged is not None:
        summary.update(diverged_at_step=diverged.step, last_good_step=diverged.good_step)
    if writer:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if (run_dir / "metrics.jsonl").exists() and not summary["interrupted"]:
            plot_run(run_dir / "metrics.jsonl", run_dir / "curriculum.png", title=config.name)
        run.push()
    if diverged is not None:
        raise diverged
    return summary
