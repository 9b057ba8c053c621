"""Where a train step's time goes, our compiled step next to the PyTorch baseline: milliseconds per step by kind.

    python bench/profile_step.py                                  # tiny-gpt2-4x4 at Δ8 (BENCHMARKS.md)
    python bench/profile_step.py train.remove_per_epoch=64        # any dotted overrides, as torch_baseline.py
    python bench/profile_step.py --no-torch --config configs/cpu/mult_3x3_tiny_icot.yaml

Both sides train the same batches with the same removal counts (``bench/torch_baseline.py``'s plan and
torch training step): ``--warmup`` steps first (compilation, allocator warm-up), then ``--steps`` steps
timed without a profiler (the median step below), then the next ``--steps`` steps under the profiler
(``jax.profiler`` / ``torch.profiler``), whose per-operation times are summed by kind:

* **matrix multiplies**: XLA ``dot``s and the library fusions that hold one (YNNPACK, XNNPACK, oneDNN);
  torch's ``mm``, ``addmm``, ``bmm``, ``baddbmm``;
* **copies and transposes**: XLA fusions named after a ``copy`` or ``transpose`` (layout changes, e.g. the
  transposed operands of weight-gradient multiplies); torch's ``copy_``, ``clone``, ``contiguous``, ``cat``,
  ``_to_copy``;
* **everything else**: elementwise work, reductions, dropout masks, the loss, the optimizer.

Then the step's dense products alone, by form (forward ``x·W``, input gradient ``g·Wᵀ``, weight gradient
``xᵀ·g``, each weight of each block on random operands of the profiled batch's token count): what each
side's matrix-multiply library does without the rest of the step around it.

The profiled sums are not the step time: XLA:CPU runs independent operations concurrently (sums can
exceed the step), torch's profiler adds a cost to every operation (its sum exceeds the unprofiled step).
Compare kinds between the sides, and step times only from the unprofiled median. Both sides run in this
process, one after the other (JAX first); run it on an otherwise idle machine, with
``OMP_WAIT_POLICY=PASSIVE`` so that torch's idle OpenMP threads do not spin. The JAX trace is kept under
``--trace-dir`` when given (TensorBoard's profile plugin or Perfetto read it). The last line is JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from icot_jax.build import build_trainer
from icot_jax.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import torch_baseline  # noqa: E402
import train_throughput  # noqa: E402

KINDS = ("matmul", "copy", "other")
KIND_LABELS = {"matmul": "matrix multiplies", "copy": "copies and transposes", "other": "everything else"}
LIBRARY_FUSIONS = ("__ynn_fusion", "__xnn_fusion", "__onednn_fusion")
CONTROL_OPCODES = {"while", "conditional", "call", "async-start", "async-done"}
"""XLA:CPU thunks that only run other thunks (their profile events would count their operations twice)."""
TORCH_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
TORCH_COPY = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::_to_copy"}

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


# ----------------------------------------------------------------------------------------------- XLA side


def xla_kinds(hlo_text: str) -> dict[str, str]:
    """``{instruction name: kind}`` for every operation of a compiled module's text (``compile().as_text()``),
    control-flow thunks left out. A library fusion is a matrix multiply when its body holds a ``dot`` or
    a ``convolution`` (YNNPACK also runs reductions as fusions)."""
    bodies, current = collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if header:
            current = header.group(1)
        elif current is not None:
            bodies[current].append(line)
    kinds = {}
    for lines in bodies.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match or match.group(2) in CONTROL_OPCODES:
                continue
            name, opcode = match.groups()
            kinds[name] = _xla_kind(name, opcode, line, bodies)
    return kinds


def _xla_kind(name: str, opcode: str, line: str, bodies: dict[str, list[str]]) -> str:
    if opcode in ("dot", "convolution"):
        return "matmul"
    if opcode == "fusion" and any(library in line for library in LIBRARY_FUSIONS):
        called = _CALLS.search(line)
        body = bodies.get(called.group(1), []) if called else []
        if any(re.search(r"\s(dot|convolution)\(", inner) for inner in body):
            return "matmul"
    if opcode in ("copy", "transpose") or (opcode == "fusion" and re.search(r"copy|transpose", name)):
        return "copy"
    return "other"


def xla_profile_ms(trace_dir: Path, kinds: dict[str, str], module: str, steps: int) -> dict[str, float]:
    """Milliseconds per step by kind of the operations of ``module`` in a ``jax.profiler`` trace."""
    files = sorted(glob.glob(str(trace_dir / "plugins" / "profile" / "*" / "*.trace.json.gz")))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}/plugins/profile: the profiler wrote no trace")
    events = json.loads(gzip.open(files[-1]).read())["traceEvents"]
    totals = dict.fromkeys(KINDS, 0.0)
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") != "X" or args.get("hlo_module") != module or args.get("hlo_op") not in kinds:
            continue
        totals[kinds[args["hlo_op"]]] += event["dur"] / 1000.0
    return {kind: total / steps for kind, total in totals.items()}


def profile_jax(config: Config, warmup: int, steps: int, trace_dir: Path) -> dict:
    """Our train step: ``warmup`` steps, ``steps`` timed, ``steps`` profiled; figures per step."""
    texts = {}

    def before_step(index, state, batch, plan, width):
        if index == warmup + steps:
            jax.profiler.start_trace(str(trace_dir))
        if width not in texts:  # the program of this width, as the step compiles it (names match the trace)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            texts[width] = step.lower(abstract, batch, plan.n_remove, width).compile().as_text()

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(config, Path(run_dir))
        step, products = trainer.step, dense_products(trainer.hf_config)
        record = train_throughput.time_steps(trainer, warmup + 2 * steps, before_step)
        del trainer
        if record.skipped:  # checked first: a skipped batch can be the one the trace was to start at
            raise SystemExit(f"{record.skipped} batch(es) longer than train.max_len_train after removal: profile "
                             f"a setting whose batches all train (the loop would skip them)")
        jax.profiler.stop_trace()
    kinds = {}
    for text in texts.values():
        kinds.update(xla_kinds(text))
    module = re.search(r"^HloModule ([\w.\-]+)", next(iter(texts.values())), re.M).group(1)
    times, used = record.column("seconds"), record.column("width")
    return {"step_ms": 1000 * statistics.median(times[warmup:warmup + steps]),
            "profiled_ms": xla_profile_ms(trace_dir, kinds, module, steps), "widths": sorted(texts),
            "tokens": config.train.batch_size * statistics.median(used[warmup + steps:]), "products": products}


def dense_products(hf_config) -> list[tuple[int, int]]:
    """``(in, out)`` of every dense layer's weight in the model's blocks (GPT-2: q/k/v, attention output,
    MLP in and out), each ``n_layer`` times."""
    d = hf_config.n_embd
    ffn = hf_config.n_inner or 4 * d
    return [(d, 3 * d), (d, d), (d, ffn), (ffn, d)] * hf_config.n_layer


GEMM_FORMS = ("forward x·W", "input gradient g·Wᵀ", "weight gradient xᵀ·g")


def gemm_alone_ms(tokens: int, products: list[tuple[int, int]], backend: str, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per step of the step's dense products run alone, one form at a time (``backend``: ``jax``
    or ``torch``): each weight's forward product, input gradient and weight gradient on random float32
    operands of the step's token count, as the train step multiplies them (attention's batched products aside)."""
    rng = np.random.default_rng(0)
    totals = dict.fromkeys(GEMM_FORMS, 0.0)
    for n_in, n_out in sorted(set(products)):
        x, w, g = (rng.standard_normal(shape, np.float32) for shape in ((tokens, n_in), (n_in, n_out), (tokens, n_out)))
        for form, (fn, args) in zip(GEMM_FORMS, ((lambda x, w: x @ w, (x, w)), (lambda g, w: g @ w.T, (g, w)),
                                                 (lambda x, g: x.T @ g, (x, g)))):
            totals[form] += products.count((n_in, n_out)) * _time_product(fn, args, backend, repeats)
    return totals


def _time_product(fn, args, backend: str, repeats: int) -> float:
    if backend == "jax":
        fn, args = jax.jit(fn), [jax.device_put(a) for a in args]
        sync = jax.block_until_ready
    else:
        import torch

        args, sync = [torch.from_numpy(a) for a in args], (lambda out: out)
    for _ in range(2):
        sync(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    sync(out)
    return 1000 * (time.perf_counter() - start) / repeats


# --------------------------------------------------------------------------------------------- torch side


def torch_kind(name: str) -> str:
    """The kind of a torch operator (``aten::...``)."""
    return "matmul" if name in TORCH_MATMUL else "copy" if name in TORCH_COPY else "other"


def profile_torch(config: Config, warmup: int, steps: int) -> dict:
    """The torch baseline's step on the same batches: ``warmup``, ``steps`` timed, ``steps`` profiled."""
    import torch

    with tempfile.TemporaryDirectory() as run_dir:
        batches, tokenizer = torch_baseline.planned_batches(config, Path(run_dir), warmup + 2 * steps)
    trainer = torch_baseline.TorchTrainer(config, tokenizer)
    times = []
    for batch in batches[:warmup + steps]:
        start = time.perf_counter()
        trainer.step(batch)
        times.append(time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for batch in batches[warmup + steps:]:
            trainer.step(batch)
    totals = dict.fromkeys(KINDS, 0.0)
    for event in profiler.key_averages():
        totals[torch_kind(event.key)] += event.self_cpu_time_total / 1000.0
    return {"step_ms": 1000 * statistics.median(times[warmup:]),
            "profiled_ms": {kind: total / steps for kind, total in totals.items()},
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- main


def print_table(sides: dict[str, dict]) -> None:
    """Per-step figures of each side, one column per side."""
    names = list(sides)
    print(f"  {'ms per step':34s}" + "".join(f"{name:>12s}" for name in names))
    print(f"  {'step, no profiler (median)':34s}" + "".join(f"{sides[n]['step_ms']:12.1f}" for n in names))
    for kind in KINDS:
        print(f"  {KIND_LABELS[kind] + ' (profiled)':34s}" + "".join(f"{sides[n]['profiled_ms'][kind]:12.1f}" for n in names))
    print(f"  {'sum of profiled operations':34s}" + "".join(f"{sum(sides[n]['profiled_ms'].values()):12.1f}" for n in names))
    print(f"  the step's dense products alone ({int(sides[names[0]]['gemm_tokens'])} tokens):")
    for form in GEMM_FORMS:
        print(f"    {form:32s}" + "".join(f"{sides[n]['gemm_alone_ms'][form]:12.1f}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=torch_baseline.DEFAULT_CONFIG)
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (default 10)")
    parser.add_argument("--steps", type=int, default=15, help="steps timed, then as many profiled (default 15)")
    parser.add_argument("--no-torch", action="store_true", help="profile our step only")
    parser.add_argument("--trace-dir", type=Path, help="keep the JAX trace here (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides (default: Δ8)")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step compiles)")
    overrides = args.overrides or torch_baseline.SETTINGS["delta8"]
    config = torch_baseline.load_bench_config(args.config, overrides)
    total = args.warmup + 2 * args.steps
    print(f"{config.name} ({' '.join(overrides)}): batch {config.train.batch_size}, steps 0-{args.warmup - 1} warm-up, "
          f"{args.warmup}-{args.warmup + args.steps - 1} timed, {args.warmup + args.steps}-{total - 1} profiled; "
          f"jax on {jax.devices()[0].device_kind}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = args.trace_dir or Path(scratch)
        sides = {"jax": profile_jax(config, args.warmup, args.steps, trace_dir)}
    if not args.no_torch:
        sides["torch"] = profile_torch(config, args.warmup, args.steps)
    tokens, products = int(sides["jax"].pop("tokens")), sides["jax"].pop("products")
    for name, side in sides.items():
        side.update(gemm_tokens=tokens, gemm_alone_ms=gemm_alone_ms(tokens, products, name))
    print(f"  jax output widths {sides['jax']['widths']}"
          + (f"; torch {sides['torch']['threads']} threads" if "torch" in sides else ""))
    print_table(sides)
    print(json.dumps({"config": config.name, "overrides": overrides, **sides}))


if __name__ == "__main__":
    main()
