"""Training throughput of the compiled train step over a full curriculum (BENCHMARKS.md `tiny-gpt2-4x4`).

Runs one config's training loop (data, curriculum, optimizer resets; no evaluation, no checkpoints) for
`--epochs` epochs and prints examples/s and non-pad tokens/s with compilation excluded, the compile time,
the number of train-step compilations over the whole schedule, and the time per epoch.

    python bench/train_throughput.py                                   # tiny-gpt2-4x4 on this machine
    python bench/train_throughput.py --config configs/paper/mult_4x4_gpt2_small_icot.yaml --steps 50

Each batch runs at the output width the training loop gives it (the smallest of the run's width buckets
that holds the batch after removal), so a later schedule step costs less than an early one. Compile
time is the sum over first calls at each width of their wall time minus the median of the others (a
first call traces, compiles and runs once); throughput excludes those calls (the JSON line lists the
steps it timed, ``timed_steps``, with each one's output width and milliseconds, ``timed_widths`` and
``timed_step_ms``, so that ``torch_baseline.py`` times the same ones and compares them width by width).
Tokens are the real tokens after removal, reported per step and in total.

Model FLOPs utilisation (MFU) uses the PaLM convention: a token costs ``6·N + 12·layers·d_model·S``
FLOPs (forward and backward; N = parameters without the position table, S = the batch's output
width), counted over real tokens only, divided by the step time and the chip's peak. The peak comes
from ``--peak-tflops`` or, for known accelerators, from ``PEAK_TFLOPS`` (dense bf16 figures from the
vendors' data sheets); on a CPU no MFU is printed unless ``--peak-tflops`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from icot_jax.build import build_trainer
from icot_jax.config import load_config
from icot_jax.removal import post_removal_lengths

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {  # dense bf16 peak per JAX device, vendor data sheets (fp32 matmuls on GPUs use TF32 at half)
    "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100": 989.4, "NVIDIA H200": 989.4,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
}
REFERENCE_VALID = REPO.parent / "shared" / "data" / "reference" / "4_by_4_mult" / "valid.txt"


def matmul_params(params) -> int:
    """Parameters that cost FLOPs per token: all but GPT-2's position table (a lookup, not a matmul)."""
    return sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
               if "wpe" not in jax.tree_util.keystr(path))


def flops_per_token(n_params: int, config, seq_len: int) -> float:
    """Training FLOPs per token, PaLM convention: ``6·N + 12·layers·d_model·seq_len``."""
    return 6.0 * n_params + 12.0 * config.num_layers * config.hidden_size * seq_len


def peak_tflops(device_kind: str, dtype: str, given: float | None) -> float | None:
    """The peak to divide by: ``given``, else the table's bf16 figure (halved for fp32 on GPUs: TF32)."""
    if given is not None:
        return given
    peak = PEAK_TFLOPS.get(device_kind)
    if peak is None:
        return None
    return peak / 2 if dtype == "float32" and device_kind.startswith("NVIDIA") else peak


@dataclasses.dataclass
class StepRecord:
    """What :func:`time_steps` measured: one row per trained batch (skipped batches only counted)."""

    rows: list[dict] = dataclasses.field(default_factory=list)
    """``index``, ``width``, ``seconds``, ``first_call`` (it compiled), ``loss``, ``examples``, ``tokens``,
    ``flops``."""
    resets: int = 0
    skipped: int = 0

    def column(self, key: str) -> np.ndarray:
        return np.array([row[key] for row in self.rows])


def time_steps(trainer, total: int, before_step: Callable | None = None) -> StepRecord:
    """Run ``total`` batches of ``trainer`` as the loop does (plan, reset, skip, width) and time each step.

    ``before_step(index, state, batch, plan, width)``, when given, runs before each trained batch, outside
    the timed span (``bench/profile_step.py`` starts its trace and reads each width's program there).
    """
    step, state, curriculum, loader, widths = (trainer.step, trainer.state, trainer.curriculum, trainer.loader,
                                               trainer.widths)
    model_config = nnx.merge(trainer.graphdef, state.params, state.rest).config
    n_params = matmul_params(state.params)
    del trainer  # the step donates the state: keep no other reference
    record, prev_cot_left = StepRecord(), True
    for index in range(total):
        epoch, in_epoch = divmod(index, loader.steps_per_epoch)
        batch = loader.batch(epoch, in_epoch)
        plan = curriculum.plan(index, batch["seps"], batch["example_mask"], prev_cot_left=prev_cot_left)
        prev_cot_left = plan.cot_left
        if plan.skip:  # longer than max_len_train after removal: the loop does not train on it
            record.skipped += 1
            continue
        width = widths.width(plan.batch_length)
        if before_step is not None:
            before_step(index, state, batch, plan, width)
        compiles = step.compiles
        start = time.perf_counter()
        if plan.reset_optimizer:
            state = step.reset_optimizer(state)
            record.resets += 1
        state, metrics = step(state, batch, plan.n_remove, width)
        jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - start
        real = batch["example_mask"]
        tokens = int(post_removal_lengths(batch["seps"][real], plan.n_remove[real]).sum())
        record.rows.append({"index": index, "width": width, "seconds": seconds, "first_call": step.compiles > compiles,
                            "loss": float(metrics["loss"]), "examples": int(real.sum()), "tokens": tokens,
                            "flops": tokens * flops_per_token(n_params, model_config, width)})
    return record


def run(config_path: Path, overrides: list[str], steps: int | None, peak: float | None = None) -> dict:
    """Train for the config's epochs (or ``steps`` batches) and return the measured figures."""
    if REFERENCE_VALID.exists() and "generate_digits: 4" in config_path.read_text():
        overrides = [f"data.valid={REFERENCE_VALID}", *overrides]  # generated train data avoids its pairs
    config = load_config(config_path, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(config, Path(run_dir))
        step, loader, widths = trainer.step, trainer.loader, trainer.widths
        per_run = loader.steps_per_epoch * config.train.epochs
        total = min(steps or per_run, per_run)
        record = time_steps(trainer, total)
        del trainer
    return report(config, record, step.compiles, widths, loader.steps_per_epoch, total, peak)


def report(config, record: StepRecord, compiles: int, widths, steps_per_epoch: int, total: int,
           peak: float | None) -> dict:
    """The JSON figures of a timed run: steady-state throughput (first calls of each width excluded)."""
    warm = ~record.column("first_call")
    times = record.column("seconds")
    steady = times[warm]
    median = statistics.median(steady)
    timed_examples, timed_tokens, flops = (record.column(key)[warm] for key in ("examples", "tokens", "flops"))
    device_kind = str(jax.devices()[0].device_kind)
    model_flops_per_s = flops.sum() / steady.sum()
    peak = peak_tflops(device_kind, config.model.dtype, peak)
    first, last = record.rows[0], record.rows[-1]
    return {
        "config": config.name,
        "device": device_kind,
        "dtype": f"{config.model.param_dtype} params, {config.model.dtype} compute",
        "steps": total,
        "batch_size": config.train.batch_size,
        "examples_per_s": timed_examples.sum() / steady.sum(),
        "tokens_per_s": timed_tokens.sum() / steady.sum(),
        "median_step_ms": 1000 * median,
        "compile_s": float(times[~warm].sum() - (~warm).sum() * median),
        "train_step_compiles": compiles,
        "widths": list(widths.buckets),
        "expected_padding": widths.padding,
        "skipped_batches": record.skipped,
        "optimizer_resets": record.resets,
        "epoch_s": float(steady.mean()) * steps_per_epoch,
        "timed_steps": record.column("index")[warm].tolist(),
        "timed_widths": record.column("width")[warm].tolist(),
        "timed_step_ms": (1000 * steady).tolist(),
        "loss_first_step": first["loss"],
        "loss_last_step": last["loss"],
        "mean_tokens_first_step": first["tokens"] / max(first["examples"], 1),
        "mean_tokens_last_step": last["tokens"] / max(last["examples"], 1),
        "model_tflops_per_s": model_flops_per_s / 1e12,
        "peak_tflops": peak,
        "mfu": model_flops_per_s / (peak * 1e12) if peak else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "bench" / "tiny_gpt2_4x4.yaml")
    parser.add_argument("--steps", type=int, help="stop after this many batches (default: all epochs)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args()
    result = run(args.config, args.overrides, args.steps, args.peak_tflops)
    print(f"{result['config']} on {result['device']} ({result['dtype']}): {result['steps']} steps of batch "
          f"{result['batch_size']}")
    print(f"  examples/s        {result['examples_per_s']:.1f}")
    print(f"  tokens/s          {result['tokens_per_s']:.0f} (real tokens after removal)")
    print(f"  median step       {result['median_step_ms']:.1f} ms; epoch {result['epoch_s']:.1f} s (mean step × steps)")
    print(f"  compile           {result['compile_s']:.1f} s; train-step compilations: {result['train_step_compiles']}"
          f" over {result['optimizer_resets']} optimizer resets")
    print(f"  widths            {result['widths']} (expected padding {result['expected_padding'] or 0:.1%} of real "
          f"tokens); {result['skipped_batches']} batches skipped (max_len_train)")
    mfu = f"; MFU {100 * result['mfu']:.1f}% of {result['peak_tflops']:g}" if result["mfu"] is not None else ""
    print(f"  model FLOPs       {result['model_tflops_per_s']:.3f} TFLOP/s{mfu}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
