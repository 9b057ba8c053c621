"""Summarise training runs as a Markdown table (the source of the tables in docs/RESULTS.md).

    python bench/summarize_runs.py runs/results/mult_3x3_tiny_{icot,explicit,no_cot}
    python bench/summarize_runs.py --timeline 10 runs/4x4   # count and exact match every 10 training minutes

For each run directory: the mode, steps, training wall time (``summary.json``), CoT tokens left per
example at the last logged step, validation exact match at the last evaluation and at the best one
(``metrics.jsonl``; "best" follows the reference's rule, so for ICoT-SI it is the best with no CoT
left), the highest validation accuracy at any evaluation, and, when ``icot eval --checkpoint RUN`` has
written ``eval.json`` there, its accuracy, examples/s and generated tokens per example. A run stopped
before its end (no ``summary.json``, or one marked ``interrupted`` by SIGTERM) is reported as far as its
``metrics.jsonl`` goes, marked "(stopped)".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from icot_jax.loop.logs import count_spans, plot_run, read_metrics


def summarize(run_dir: Path) -> dict:
    """One row of figures for ``run_dir`` (an ``icot train`` run directory, finished or stopped)."""
    for name in ("metrics.jsonl", "config.yaml"):
        if not (run_dir / name).exists():
            raise SystemExit(f"{run_dir}: no {name}; is this a training run directory?")
    records = read_metrics(run_dir / "metrics.jsonl")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_accuracy" in r]
    finished = (run_dir / "summary.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text()) if finished else {
        "steps": train[-1]["step"] if train else 0, "seconds": train[-1]["elapsed_s"] if train else 0.0,
        "train_step_compiles": int(train[-1]["train_step_compiles"]) if train else None}
    row = {
        "run": run_dir.name if finished and not summary.get("interrupted") else f"{run_dir.name} (stopped)",
        "mode": config["train"]["mode"],
        "steps": summary["steps"],
        "train_minutes": summary["seconds"] / 60,
        "cot_left": train[-1]["mean_cot_left"] if train else None,
        "final_val_accuracy": evals[-1]["val_accuracy"] if evals else None,
        "best_val_accuracy": summary.get("best_accuracy"),
        "max_val_accuracy": max((r["val_accuracy"] for r in evals), default=None),
        "train_step_compiles": summary.get("train_step_compiles"),
    }
    eval_file = run_dir / "eval.json"
    if eval_file.exists():
        e = json.loads(eval_file.read_text())
        row.update(eval_accuracy=e["accuracy"], eval_examples_per_s=e["examples_per_second"],
                   eval_tokens_per_example=e["mean_generated_tokens"], eval_n=e.get("n_examples"))
    return row


def removal_shocks(run_dir: Path) -> list[tuple[int, float, float]]:
    """``(scheduled count, token accuracy just before, just after)`` at each step where the schedule advanced
    while CoT was left: how hard each removal hits the model (the training records of ``metrics.jsonl``)."""
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    shocks = []
    for before, after in zip(train, train[1:]):
        if after["scheduled_to_remove"] > before["scheduled_to_remove"] and before["mean_cot_left"] > 0:
            shocks.append((after["scheduled_to_remove"], before["token_accuracy"], after["token_accuracy"]))
    return shocks


def steps_per_removed_token(spans: list[tuple[int, int, str | None]]) -> float | None:
    """Mean steps a removed token got: the steps at every count after the first (which removes nothing new)
    over the tokens removed from the first count to the last one left (``None`` before two advances)."""
    if len(spans) < 2:
        return None
    return sum(steps for _, steps, _ in spans[1:]) / (spans[-1][0] - spans[0][0])


def print_removals(run: Path) -> None:
    """Token accuracy before/after each removal, and the steps spent at each scheduled count."""
    shocks = removal_shocks(run)
    if shocks:
        drops = [before - after for _, before, after in shocks]
        print(f"\n{run.name}: token accuracy before -> after each removal (scheduled count: before/after)")
        print("  " + "  ".join(f"{n}: {b:.2f}/{a:.2f}" for n, b, a in shocks))
        print(f"  mean drop {sum(drops) / len(drops):.3f} over {len(shocks)} removals")
    spans = count_spans(read_metrics(run / "metrics.jsonl"))
    if spans:
        print(f"{run.name}: steps at each scheduled count before it advanced (count: steps, why)")
        print("  " + "  ".join(f"{count}: {steps}" + (f" {why}" if why else "") for count, steps, why in spans))
        mean = steps_per_removed_token(spans)
        if mean is not None:
            print(f"  {mean:.0f} steps per removed token (counts {spans[1][0]}-{spans[-1][0]})")


def timeline(run_dir: Path, every_minutes: float = 0.0) -> list[dict]:
    """Where a run stood at each evaluation: training minutes (``elapsed_s``, summed over resumed pieces),
    step, the scheduled count and mean CoT tokens left at the last logged batch before it, validation exact
    match and generated tokens per example. With ``every_minutes``, an evaluation is kept only once that
    many minutes have passed since the last one kept (the last evaluation is always kept)."""
    rows, train = [], None
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if "loss" in record:
            train = record
        elif "val_accuracy" in record and train is not None:
            seconds = record.get("elapsed_s")  # runs logged before the run clock have none
            rows.append({"minutes": None if seconds is None else seconds / 60, "step": record["step"],
                         "scheduled": "all" if train["remove_all"] else train["scheduled_to_remove"],
                         "cot_left": train["mean_cot_left"], "val_accuracy": record["val_accuracy"],
                         "generated_tokens": record.get("val_mean_generated_tokens")})
    if every_minutes <= 0 or not rows:
        return rows
    kept = [rows[0]]
    for row in rows[1:-1]:
        if row["minutes"] is None or kept[-1]["minutes"] is None or row["minutes"] - kept[-1]["minutes"] >= every_minutes:
            kept.append(row)
    return kept + rows[-1:] if len(rows) > 1 else kept


def print_timeline(run: Path, every_minutes: float) -> None:
    """:func:`timeline` as a Markdown table."""
    print(f"\n{run.name}: scheduled count and exact match over training time")
    print("| train min | step | scheduled count | CoT tokens left | val exact match | generated tokens |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in timeline(run, every_minutes):
        print(f"| {_fmt(r['minutes'], '.1f')} | {r['step']} | {r['scheduled']} | {r['cot_left']:.1f} "
              f"| {r['val_accuracy']:.3f} | {_fmt(r['generated_tokens'], '.1f')} |")


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="training run directories")
    parser.add_argument("--plot", action="store_true",
                        help="(re)draw each run's curriculum.png (schedule and accuracies over steps), also for "
                             "runs stopped before their end")
    parser.add_argument("--removals", action="store_true",
                        help="also print each run's token accuracy just before/after every schedule advance "
                             "and the steps spent at each scheduled count")
    parser.add_argument("--timeline", type=float, metavar="MINUTES", nargs="?", const=0.0,
                        help="also print each run's scheduled count and exact match at its evaluations over training "
                             "time, at most one row per MINUTES (default: every evaluation)")
    args = parser.parse_args()
    rows = [summarize(run) for run in args.runs]
    if args.plot:
        for run in args.runs:
            plot_run(run / "metrics.jsonl", run / "curriculum.png", title=run.name)
            print(f"wrote {run / 'curriculum.png'}")
    print("| run | mode | steps | train min | CoT tokens left | val acc (last eval) | best val acc "
          "| max val acc | eval acc | eval examples/s | generated tokens/example | compiles |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['mode']} | {r['steps']} | {r['train_minutes']:.1f} | {_fmt(r['cot_left'], '.1f')} "
              f"| {_fmt(r['final_val_accuracy'], '.3f')} | {_fmt(r['best_val_accuracy'], '.3f')} "
              f"| {_fmt(r['max_val_accuracy'], '.3f')} "
              f"| {_fmt(r.get('eval_accuracy'), '.3f')} | {_fmt(r.get('eval_examples_per_s'), '.1f')} "
              f"| {_fmt(r.get('eval_tokens_per_example'), '.1f')} | {_fmt(r['train_step_compiles'], 'd')} |")
    if args.removals:
        for run in args.runs:
            print_removals(run)
    if args.timeline is not None:
        for run in args.runs:
            print_timeline(run, args.timeline)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
