"""PyTorch baseline for `train_throughput.py`: the same GPT-2, batches and removal counts, trained the reference's way.

One command measures both sides on this machine, alternating them, and prints medians and the ratio:

    python bench/torch_baseline.py                       # tiny-gpt2-4x4, Δ8 and Δ64, 3 repeats each
    python bench/torch_baseline.py --setting delta8 --repeats 5
    python bench/torch_baseline.py --steps 20 model.overrides.n_layer=2   # any config / dotted overrides

Our side is ``bench/train_throughput.py`` run as a subprocess with the same config and overrides; its final
JSON line gives examples/s, real tokens/s, the median step and the compile time. The torch side runs in
this process: transformers ``GPT2LMHeadModel`` (random init, the config's architecture and dropout, the
built-in tokenizer's vocabulary), ``torch.optim.AdamW``, eager mode, float32, and the reference's
``src/train.py`` semantics (REFERENCE_SEMANTICS.md):

* the same batches in the same order and the same per-example removal counts: both sides take them from
  ``icot_jax`` (``build_data``, ``BatchLoader``, ``Curriculum.plan``), never from the JAX model;
* removal on the host: the CoT span of each row is deleted, each row is cut at its own last EOS and the
  batch is re-padded with EOS to its longest row (dynamic re-padding, so steps get cheaper as CoT goes);
* labels ``-100`` up to and including the first EOS and on padding; token-mean loss (transformers'
  causal-LM loss); gradient clipping at ``train.max_grad_norm``; a fresh AdamW whenever the plan says
  ``reset_optimizer``;
* settings: ``delta8`` is BENCHMARKS.md's Δ = 8 (``train.remove_per_epoch=8``: rows barely shrink in
  the epoch); ``delta64`` (``train.remove_per_epoch=64``) removes one more token every
  ``round(125 / 64) = 2`` steps, so the 46-token 4×4 CoT is gone about 90 steps into the epoch.

Fairness choices:

* Both sides time the same steps: those ``train_throughput.py`` timed (``timed_steps``: every step but
  the first at each output width, which compiles; torch's first step, which warms its allocator and
  oneDNN kernels, is among the untimed ones). Data loading and planning are outside the timed region on both
  sides; the host-side removal and re-padding are inside it on the torch side, as the in-graph removal
  is inside our compiled step.
* torch uses its default intra-op thread count for this machine (printed; ``--torch-threads`` changes it)
  and AdamW ``fused=True`` where this torch build supports it, as the reference does; JAX uses its
  defaults (its device is printed). On a machine shared with other work, torch's OpenMP threads spin
  while they wait and collapse when the cores are oversubscribed (on 2 cores at load ~6: 6.4 s per step
  with 2 threads, 1.5 s with ``OMP_WAIT_POLICY=PASSIVE`` or 1 thread); run with
  ``OMP_WAIT_POLICY=PASSIVE`` there (printed; XLA:CPU runs its own thread pool, not OpenMP).
* The two sides never run at the same time, and they alternate over ``--repeats``; medians are printed,
  and the ratio is the median of the per-repeat ratios (the two runs of a repeat saw the most similar load).
* Token counts per step are identical by construction (both count ``post_removal_lengths`` of the same
  plan); the torch side checks its re-padded batches against that count at every step, and our side's
  reported steps, optimizer resets and first- and last-step tokens per example against its own.
* Initialisations differ (torch's GPT-2 init vs ours), so losses match only roughly; both start near
  ``ln(vocabulary)`` (printed). Our losses are printed when ``train_throughput.py``'s JSON line carries
  ``loss_first_step`` and ``loss_last_step``, else "not reported".
* Then the same steps by our output width (pooled over the repeats): each side's median step and the
  ratio of their summed times, so a gap can be placed (narrow steps once the CoT is gone, or wide ones).

The final line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import NamedTuple

import numpy as np

from icot_jax.build import build_curriculum, build_data
from icot_jax.config import Config, RemovalSide, load_config
from icot_jax.data.loader import BatchLoader
from icot_jax.removal import StepPlan, post_removal_lengths, removed_counts

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = REPO / "bench" / "train_throughput.py"
DEFAULT_CONFIG = REPO / "configs" / "bench" / "tiny_gpt2_4x4.yaml"
REFERENCE_VALID = REPO.parent / "shared" / "data" / "reference" / "4_by_4_mult" / "valid.txt"
SETTINGS = {"delta8": ["train.remove_per_epoch=8"], "delta64": ["train.remove_per_epoch=64"]}
IGNORE = -100


# ----------------------------------------------------------------------------------------------------
# Batches: the same rows and removal counts as our loop, removed and re-padded on the host


class Repadded(NamedTuple):
    """A batch after host-side removal, as the reference trains on it."""

    input_ids: np.ndarray
    """``int64[real rows, width]``: kept tokens, then ``pad_id``; ``width`` is the longest row."""
    labels: np.ndarray
    """``int64[real rows, width]``: the ids, ``-100`` up to and including the first EOS and on padding."""
    lengths: np.ndarray
    """``int64[real rows]``: real tokens per row (up to and including its last EOS)."""


def remove_and_repad(input_ids: np.ndarray, seps: np.ndarray, n_remove: np.ndarray, example_mask: np.ndarray, *,
                     pad_id: int, side: RemovalSide = "left") -> Repadded:
    """The reference's removal of one batch, on the host.

    For each real row, deletes ``min(n_remove, CoT length)`` CoT tokens (from the left: right after the
    first EOS; from the right: right before the second), cuts the row after its last EOS, and pads every
    row with ``pad_id`` to the longest one (see :class:`Repadded`). Filler rows (``example_mask`` False)
    are dropped, as the reference's last batch of an epoch is simply short.
    """
    if side not in typing.get_args(RemovalSide):
        raise ValueError(f"side must be one of {typing.get_args(RemovalSide)}, got {side!r}")
    real = np.asarray(example_mask, bool)
    seps, n_remove = np.asarray(seps)[real], np.asarray(n_remove)[real]
    removed = removed_counts(seps, n_remove)
    rows = []
    for ids, (first_eos, second_eos, last_eos), count in zip(np.asarray(input_ids)[real], seps, removed):
        start = first_eos + 1 if side == "left" else second_eos - count
        rows.append(np.concatenate([ids[:start], ids[start + count:last_eos + 1]]))
    width = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), width), pad_id, np.int64)
    labels = np.full((len(rows), width), IGNORE, np.int64)
    for i, (row, first_eos) in enumerate(zip(rows, seps[:, 0])):
        out[i, :len(row)] = row
        labels[i, first_eos + 1:len(row)] = row[first_eos + 1:]
    return Repadded(out, labels, np.array([len(row) for row in rows], np.int64))


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """One batch of our loop as stored on the host, with its plan (removal counts, reset)."""

    input_ids: np.ndarray
    seps: np.ndarray
    example_mask: np.ndarray
    plan: StepPlan

    @property
    def examples(self) -> int:
        return int(self.example_mask.sum())

    @property
    def real_tokens(self) -> int:
        """Real tokens after removal, counted as ``train_throughput.py`` counts them."""
        real = self.example_mask
        return int(post_removal_lengths(self.seps[real], self.plan.n_remove[real]).sum())


def planned_batches(config: Config, run_dir: Path, steps: int | None = None) -> tuple[list[PlannedBatch], object]:
    """``(batches, tokenizer)``: the first ``steps`` batches (default: all epochs) of ``config``'s run.

    The rows, their order and the removal counts are those of our training loop: the same data
    preparation, loader (whole global batches) and curriculum, planned batch after batch.
    """
    data = build_data(config, run_dir)
    t = config.train
    curriculum = build_curriculum(config, len(data.train))
    loader = BatchLoader(data.train, t.batch_size, seed=t.seed, process_index=0, process_count=1)
    total = loader.steps_per_epoch * t.epochs
    batches, prev_cot_left = [], True
    for index in range(min(steps or total, total)):
        batch = loader.batch(*divmod(index, loader.steps_per_epoch))
        plan = curriculum.plan(index, batch["seps"], batch["example_mask"], prev_cot_left=prev_cot_left)
        prev_cot_left = plan.cot_left
        batches.append(PlannedBatch(batch["input_ids"], batch["seps"], batch["example_mask"], plan))
    return batches, data.tokenizer


# ----------------------------------------------------------------------------------------------------
# The torch side


def check_supported(config: Config) -> None:
    """The torch side trains a from-scratch float32 GPT-2 the reference's way; refuse anything else."""
    m, t = config.model, config.train
    unsupported = {
        "model.from_scratch": not m.from_scratch, "model.family": m.family != "gpt2",
        "model.dtype": m.dtype != "float32", "model.param_dtype": m.param_dtype != "float32",
        "train.accumulate_steps": t.accumulate_steps != 1, "train.keep_position": t.keep_position,
        "train.random_position_shift": t.random_position_shift != 0, "train.warmup_steps": t.warmup_steps != 0,
        "train.max_len_train": t.max_len_train is not None,
    }
    keys = [key for key, bad in unsupported.items() if bad]
    if keys:
        raise ValueError(f"{config.name}: the torch baseline supports a from-scratch float32 GPT-2 with the "
                         f"reference's plain training step only; unsupported setting(s): {', '.join(keys)}")


def gpt2_config(config: Config, tokenizer):
    """The transformers ``GPT2Config`` of ``config``'s model: overrides applied, the tokenizer's vocabulary."""
    import transformers

    hf_config = transformers.GPT2Config()
    for key, value in config.model.overrides.items():
        if not hasattr(hf_config, key):
            raise ValueError(f"model.overrides.{key}: GPT2Config has no field '{key}'")
        setattr(hf_config, key, value)
    hf_config.vocab_size = len(tokenizer)
    hf_config.eos_token_id = hf_config.bos_token_id = tokenizer.eos_token_id
    return hf_config


def _adamw(params, train_config):
    """A fresh ``torch.optim.AdamW`` (torch's betas and eps), fused where this build supports it."""
    import torch

    kwargs = dict(lr=train_config.lr, weight_decay=train_config.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # builds without a fused CPU kernel
        return torch.optim.AdamW(params, **kwargs)


class TorchTrainer:
    """A fresh ``GPT2LMHeadModel`` (eager, float32) trained the reference's way, one planned batch at a time."""

    def __init__(self, config: Config, tokenizer):
        import torch
        import transformers

        check_supported(config)
        self.train_config, self.pad_id = config.train, tokenizer.eos_token_id
        torch.manual_seed(self.train_config.seed)
        self.model = transformers.GPT2LMHeadModel(gpt2_config(config, tokenizer)).train()
        self.params = list(self.model.parameters())
        self.optimizer = _adamw(self.params, self.train_config)
        self.resets = 0

    def step(self, batch: PlannedBatch) -> tuple[float, Repadded]:
        """One update on ``batch`` (a fresh AdamW first if its plan resets the optimizer); returns the loss
        and the re-padded batch it trained on."""
        import torch

        t = self.train_config
        if batch.plan.reset_optimizer:
            self.optimizer = _adamw(self.params, t)
            self.resets += 1
        repadded = remove_and_repad(batch.input_ids, batch.seps, batch.plan.n_remove, batch.example_mask,
                                    pad_id=self.pad_id, side=t.removal_side)
        loss = self.model(input_ids=torch.from_numpy(repadded.input_ids),
                          labels=torch.from_numpy(repadded.labels)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), repadded


def train_torch(config: Config, batches: list[PlannedBatch], tokenizer) -> dict:
    """Train a fresh :class:`TorchTrainer` on ``batches``; return timings, tokens and losses.

    Raises if a re-padded batch's real tokens differ from the plan's count (what our side counts).
    """
    trainer = TorchTrainer(config, tokenizer)
    times, losses = [], []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        loss, repadded = trainer.step(batch)
        losses.append(loss)
        times.append(time.perf_counter() - start)
        if int(repadded.lengths.sum()) != batch.real_tokens:
            raise RuntimeError(f"step {index}: the re-padded torch batch holds {repadded.lengths.sum()} real tokens, "
                               f"the plan {batch.real_tokens}")
    return {"times": times, "loss_first_step": losses[0], "loss_last_step": losses[-1],
            "optimizer_resets": trainer.resets, "warmup_s": times[0]}


def summarize(times: list[float], batches: list[PlannedBatch], timed_steps: list[int]) -> dict:
    """Throughput over ``timed_steps`` -- the steps ``train_throughput.py`` timed (all but the first call at
    each output width, which compiles) -- the same figures it reports."""
    steady, timed = np.array([times[i] for i in timed_steps]), [batches[i] for i in timed_steps]
    return {
        "steps": len(batches),
        "examples_per_s": sum(b.examples for b in timed) / steady.sum(),
        "tokens_per_s": sum(b.real_tokens for b in timed) / steady.sum(),
        "median_step_ms": 1000 * statistics.median(steady),
        "mean_tokens_first_step": batches[0].real_tokens / max(batches[0].examples, 1),
        "mean_tokens_last_step": batches[-1].real_tokens / max(batches[-1].examples, 1),
    }


# ----------------------------------------------------------------------------------------------------
# Our side and the comparison


def run_ours(config_path: Path, overrides: list[str], steps: int | None) -> dict:
    """Run ``train_throughput.py`` in a subprocess (this checkout's ``icot_jax``); return its final JSON line."""
    command = [sys.executable, str(THROUGHPUT), "--config", str(config_path),
               *(["--steps", str(steps)] if steps else []), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_bench_config(config_path: Path, overrides: list[str]) -> Config:
    """The config as ``train_throughput.py`` loads it: generated 4×4 training data avoids the reference
    validation file's pairs, so both sides must generate it with that file as ``data.valid``."""
    if REFERENCE_VALID.exists() and "generate_digits: 4" in config_path.read_text():
        overrides = [f"data.valid={REFERENCE_VALID}", *overrides]
    return load_config(config_path, overrides)


def check_same_plan(ours: dict, torch_side: dict, setting: str) -> None:
    """Both sides trained on the same rows and removal counts: the same steps, resets and tokens per example."""
    for key in ("steps", "optimizer_resets", "mean_tokens_first_step", "mean_tokens_last_step"):
        if not math.isclose(ours[key], torch_side[key], rel_tol=1e-9):
            raise RuntimeError(f"{setting}: {key} differs between train_throughput.py ({ours[key]}) and the torch "
                               f"side ({torch_side[key]}): the two sides did not train on the same batches")
    ours_per_example = ours["tokens_per_s"] / ours["examples_per_s"]
    torch_per_example = torch_side["tokens_per_s"] / torch_side["examples_per_s"]
    if not math.isclose(ours_per_example, torch_per_example, rel_tol=1e-9):
        print(f"  note: the sides timed different steps (tokens per timed example: jax {ours_per_example:.3f}, "
              f"torch {torch_per_example:.3f}); compare tokens/s", flush=True)


def medians(ours_runs: list[dict], torch_runs: list[dict]) -> dict:
    """Median figures of each side over the repeats, and the median of the per-repeat jax/torch ratios."""
    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def ratio(key: str) -> float:
        return statistics.median(o[key] / t[key] for o, t in zip(ours_runs, torch_runs))

    figures = ("examples_per_s", "tokens_per_s", "median_step_ms")
    return {
        "jax": {key: median(ours_runs, key) for key in (*figures, "compile_s")},
        "torch": {key: median(torch_runs, key) for key in (*figures, "warmup_s")},
        "ratio_examples_per_s": ratio("examples_per_s"),
        "ratio_tokens_per_s": ratio("tokens_per_s"),
        "jax_device": ours_runs[-1]["device"],
        "train_step_compiles": ours_runs[-1].get("train_step_compiles"),
        "optimizer_resets": torch_runs[-1]["optimizer_resets"],
        "jax_loss": [ours_runs[-1].get("loss_first_step"), ours_runs[-1].get("loss_last_step")],
        "torch_loss": [torch_runs[-1]["loss_first_step"], torch_runs[-1]["loss_last_step"]],
    }


def by_width(widths: list[int], jax_ms: list[float], torch_ms: list[float]) -> list[dict]:
    """Both sides' times on the same steps grouped by our output width: steps, each side's median step and
    the jax/torch ratio of the group's summed times (its throughput ratio: both trained the same tokens).

    Why: one epoch's ratio mixes steps of very different cost; per width it shows where a gap sits (e.g.
    narrow steps after the CoT is gone against wide ones at full length).
    """
    if not len(widths) == len(jax_ms) == len(torch_ms):
        raise ValueError(f"by_width needs one width and one time per side for each step, got {len(widths)}, "
                         f"{len(jax_ms)} and {len(torch_ms)}")
    groups: dict[int, tuple[list, list]] = {}
    for width, ours, theirs in zip(widths, jax_ms, torch_ms):
        jax_times, torch_times = groups.setdefault(int(width), ([], []))
        jax_times.append(ours)
        torch_times.append(theirs)
    return [{"width": width, "steps": len(jax_times), "jax_median_step_ms": statistics.median(jax_times),
             "torch_median_step_ms": statistics.median(torch_times), "ratio": sum(torch_times) / sum(jax_times)}
            for width, (jax_times, torch_times) in sorted(groups.items())]


def print_by_width(rows: list[dict]) -> None:
    print("  by output width    steps   jax ms   torch ms   jax / torch   (median steps; ratio of summed times)")
    for row in rows:
        print(f"    {row['width']:>5}         {row['steps']:5d} {row['jax_median_step_ms']:8.1f} "
              f"{row['torch_median_step_ms']:10.1f} {row['ratio']:13.2f}")


def compare(config_path: Path, setting: str, overrides: list[str], steps: int | None, repeats: int) -> dict:
    """Alternate our side and the torch side ``repeats`` times on one setting; print and return medians."""
    overrides = [*SETTINGS[setting], *overrides]
    config = load_bench_config(config_path, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        batches, tokenizer = planned_batches(config, Path(run_dir), steps)
    gone = next((i for i, b in enumerate(batches) if not b.plan.cot_left), None)
    print(f"\n{setting} ({' '.join(overrides)}): {len(batches)} steps of batch {config.train.batch_size}, "
          f"tokens per example {batches[0].real_tokens / batches[0].examples:.1f} -> "
          f"{batches[-1].real_tokens / batches[-1].examples:.1f}, "
          f"CoT all gone from step {gone if gone is not None else '- (never)'}", flush=True)
    ours_runs, torch_runs, widths, jax_ms, torch_ms = [], [], [], [], []
    for repeat in range(repeats):
        ours_runs.append(run_ours(config_path, overrides, steps))
        torch_side = train_torch(config, batches, tokenizer)
        times, timed = torch_side.pop("times"), ours_runs[-1]["timed_steps"]
        torch_runs.append(summarize(times, batches, timed) | torch_side)
        widths += ours_runs[-1]["timed_widths"]
        jax_ms += ours_runs[-1]["timed_step_ms"]
        torch_ms += [1000 * times[i] for i in timed]
        check_same_plan(ours_runs[-1], torch_runs[-1], setting)
        print(f"  repeat {repeat + 1}: jax {ours_runs[-1]['tokens_per_s']:.0f} tokens/s, "
              f"torch {torch_runs[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    result = medians(ours_runs, torch_runs) | {"by_width": by_width(widths, jax_ms, torch_ms)}
    print_result(result, repeats, vocab=len(tokenizer))
    print_by_width(result["by_width"])
    return result


def _loss_pair(losses: list) -> str:
    if None in losses:
        return "not reported"
    return f"{losses[0]:.3f} -> {losses[1]:.3f}"


def print_result(result: dict, repeats: int, *, vocab: int) -> None:
    """The table of one setting: both sides' medians, the ratios, compile/warm-up and the losses."""
    jax_side, torch_side = result["jax"], result["torch"]
    print(f"  median of {repeats:<3}     examples/s   tokens/s   median step ms   loss first -> last step")
    print(f"  jax ({result['jax_device']}){' ' * max(0, 13 - len(result['jax_device']))}"
          f"{jax_side['examples_per_s']:10.1f} {jax_side['tokens_per_s']:10.0f}"
          f" {jax_side['median_step_ms']:16.1f}   {_loss_pair(result['jax_loss'])}")
    print(f"  torch               {torch_side['examples_per_s']:10.1f} {torch_side['tokens_per_s']:10.0f}"
          f" {torch_side['median_step_ms']:16.1f}   {_loss_pair(result['torch_loss'])} (ln vocab = {math.log(vocab):.3f})")
    print(f"  jax / torch         {result['ratio_examples_per_s']:10.2f} {result['ratio_tokens_per_s']:10.2f}"
          f"   (median of per-repeat ratios)")
    print(f"  jax compile {jax_side['compile_s']:.1f} s, {result['train_step_compiles']} train-step compilation(s); "
          f"torch warm-up step {torch_side['warmup_s']:.2f} s; {result['optimizer_resets']} optimizer resets",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--setting", choices=[*SETTINGS, "both"], default="both",
                        help="delta8: Δ 8 (BENCHMARKS.md); delta64: the whole CoT goes within the epoch")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (default 3)")
    parser.add_argument("--steps", type=int, help="stop after this many batches (default: all epochs)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's default here)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides, passed to both sides")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    default = "" if args.torch_threads else " (this machine's default)"
    print(f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads{default}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {os.cpu_count()} CPUs visible; jax runs in "
          f"train_throughput.py with its defaults", flush=True)
    settings = list(SETTINGS) if args.setting == "both" else [args.setting]
    results = {setting: compare(args.config, setting, args.overrides, args.steps, args.repeats)
               for setting in settings}
    print(json.dumps({"torch_threads": torch.get_num_threads(), "repeats": args.repeats, **results}))


if __name__ == "__main__":
    main()
