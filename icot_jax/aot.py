"""``icot aot``: compile the real train step for a TPU slice on any host and report per-chip memory.

libtpu (``pip install 'jax[tpu]'``, the ``tpu`` extra) compiles for TPUs it does not have:
``jax.experimental.topologies.get_topology_desc`` describes a slice's chips, the mesh of ``config.mesh``
is laid over them, and the train step (:class:`~icot_jax.train.step.TrainStep` with the config's model,
batch, accumulation, dtypes and shardings) is lowered over ``jax.ShapeDtypeStruct``s — no weights are
ever created — and compiled by the same XLA TPU compiler a pod would run. ``memory_analysis()`` then
gives each chip's bytes, and a step that cannot fit fails with ``RESOURCE_EXHAUSTED`` exactly as it
would on the hardware (the approach of MaxText's ``train_compile.py``)::

    icot aot configs/paper/gsm8k_mistral_7b_icot.yaml --topology v5p-8
    icot aot configs/paper/gsm8k_phi3_mini_icot.yaml train.batch_size=64 mesh.tensor=2 --topology v5e-16

The step compiled is the widest one the run executes (:func:`run_shapes`): rows stored at the width the
run's data has, compacted after removal into the widest output width of the run
(:mod:`icot_jax.train.widths`; at most ``train.max_len_train``), with the run's vocabulary. When the
data cannot be read here (files on another machine, a tokenizer on the hub), rows are stored at
``data.max_length`` and the output width is ``train.max_len_train`` (else ``data.max_length``). The
last line printed is JSON (see :meth:`AotReport.to_json`). The exit status is 0 when the step fits, 1
when it does not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from icot_jax.config import Config
from icot_jax.errors import UserError

if TYPE_CHECKING:
    import jax

GiB = 2**30


# ---------------------------------------------------------------------------------------------- slices


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a TPU generation's slice names mean and what each chip holds."""

    topology_prefix: str
    """Prefix of libtpu's topology names (``v5:2x2x1`` is a v5p slice)."""
    chip_config: str
    """``megacore``: the chip's two TensorCores form one JAX device; ``default``: one core per chip."""
    cores_per_chip: int
    """Slice names count TensorCores (v4-16 has 8 chips) or chips (v5e-16 has 16)."""
    hbm_bytes: int
    dims: int
    """2-D torus (v5e, v6e) or 3-D (v4, v5p)."""


GENERATIONS = {
    "v4": Generation("v4", "megacore", 2, 32 * GiB, 3),
    "v5p": Generation("v5", "megacore", 2, 95 * GiB, 3),
    "v5e": Generation("v5e", "default", 1, 16 * GiB, 2),
    "v6e": Generation("v6e", "default", 1, 32 * GiB, 2),
}
ALIASES = {"v5litepod": "v5e"}

# Chip grids of the standard slice shapes (Cloud TPU documentation: "TPU versions", topologies).
_GRIDS = {
    2: {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1), 16: (4, 4, 1), 32: (4, 8, 1), 64: (8, 8, 1), 128: (8, 16, 1),
        256: (16, 16, 1)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
        512: (8, 8, 8)},
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A Cloud TPU slice such as ``v5p-8``, as libtpu's compile-only topology needs it."""

    name: str
    generation: Generation
    grid: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def topology_name(self) -> str:
        dims = self.grid[:self.generation.dims]
        return f"{self.generation.topology_prefix}:{'x'.join(map(str, dims))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        # Single-host slices hold all their chips (up to 8 on v5e/v6e); larger ones have 4 chips per host.
        return self.grid if self.chips <= (8 if self.generation.dims == 2 else 4) else (2, 2, 1)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        # Wraparound links exist along full-length dimensions: 16 chips on 2-D tori, cubes of 4+ on 3-D.
        full = 16 if self.generation.dims == 2 else 4
        cube = self.generation.dims == 2 or min(self.grid) >= 4
        return tuple(bool(size >= full and cube) for size in self.grid)

    def devices(self) -> list:
        """Compile-only JAX devices of this slice (needs libtpu)."""
        from jax.experimental import topologies

        # Compiling needs no chip, so do not take libtpu's one-process-per-host lock: several compiles (or
        # one beside a training job on a TPU VM) can run at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=self.topology_name, chip_config_name=self.generation.chip_config,
                chips_per_host_bounds=self.chips_per_host_bounds, num_slices=1, wrap=self.wrap)
        except RuntimeError as err:  # no TPU plugin
            raise UserError(f"cannot describe TPU topology {self.topology_name}: {err}. AOT compilation needs "
                               "libtpu: pip install 'jax[tpu]' (or '.[tpu]')") from err
        return list(topology.devices)


def tpu_slice(name: str) -> TpuSlice:
    """The slice called ``name`` (``v4-16``, ``v5p-8``, ``v5e-16``/``v5litepod-16``, ``v6e-8``, ...)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
        raise UserError(f"--topology {name!r}: expected GENERATION-SIZE with GENERATION one of "
                         f"{sorted([*GENERATIONS, *ALIASES])}, e.g. v5p-8 or v5e-16")
    key = ALIASES.get(match.group(1), match.group(1))
    generation = GENERATIONS[key]
    size = int(match.group(2))
    chips, remainder = divmod(size, generation.cores_per_chip)
    grids = _GRIDS[generation.dims]
    if remainder or chips not in grids:
        sizes = ", ".join(f"{key}-{c * generation.cores_per_chip}" for c in grids)
        raise UserError(f"--topology {name!r}: unknown slice size; known: {sizes}")
    return TpuSlice(name, generation, grids[chips])


# ------------------------------------------------------------------------------------------ model configs


# -------------------------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class AotReport:
    """Per-chip memory and compute of one compiled train step (bytes and FLOPs are per chip)."""

    topology: str
    config: str
    mesh: dict[str, int]
    batch_size: int
    seq_len: int
    """The output width: the length of the rows the model runs on (the widest the run executes)."""
    accumulate_steps: int
    remat: str
    num_params: int
    hbm_bytes_per_device: int
    fits: bool
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    bytes_per_device: int | None = None
    """``argument + output - alias + temp``: what the step holds on each chip at once."""
    flops_per_device: float | None = None
    model_flops_per_device: float | None = None
    """``6 · num_params · tokens / chips``: the usual estimate of a dense train step (no attention)."""
    compile_seconds: float | None = None
    scan_layers: bool = False
    """``mesh.scan_layers``: the blocks compiled as one ``jax.lax.scan`` body."""
    error: str | None = None
    """The compiler's message when it ran out of memory."""
    stored_width: int | None = None
    """The width the rows are stored at before removal (the step's input)."""
    widths: list[int] | None = None
    """Every output width of the run (each compiles once); ``seq_len`` is the widest."""
    shapes_from: str = ""
    """``data`` (the run's data was read here) or ``config`` (``data.max_length`` / ``max_len_train``)."""
    vocab_size: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def table(self) -> str:
        """The human-readable summary printed above the JSON line."""
        def gib(n):
            return "—" if n is None else f"{n / GiB:.2f} GiB"

        rows = [("topology", f"{self.topology} ({math.prod(self.mesh.values())} chips, mesh {self.mesh})"),
                ("config", self.config),
                ("step", f"batch {self.batch_size} × width {self.seq_len} (rows stored at {self.stored_width}), "
                         f"accumulate {self.accumulate_steps}, remat {self.remat}, "
                         f"{'scanned' if self.scan_layers else 'unrolled'} layers, "
                         f"{self.num_params / 1e9:.3f} B parameters, vocabulary {self.vocab_size}"),
                ("widths", f"{self.widths} (from the run's {self.shapes_from})"),
                ("arguments", gib(self.argument_bytes)), ("outputs", gib(self.output_bytes)),
                ("aliased (donated)", gib(self.alias_bytes)), ("temporaries", gib(self.temp_bytes)),
                ("total per chip", gib(self.bytes_per_device)), ("HBM per chip", gib(self.hbm_bytes_per_device)),
                ("verdict", "fits" if self.fits else "DOES NOT FIT")]
        if self.flops_per_device is not None:
            ratio = self.flops_per_device / self.model_flops_per_device
            rows.append(("FLOPs per chip", f"{self.flops_per_device:.3e} compiled vs {self.model_flops_per_device:.3e}"
                                           f" = 6·N·tokens/chips (ratio {ratio:.2f})"))
        if self.compile_seconds is not None:
            rows.append(("compile time", f"{self.compile_seconds:.0f} s"))
        if self.error:
            rows.append(("compiler", self.error))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The shapes a run of a config compiles its train step for."""

    stored_width: int
    """Input rows: the width the run's data is stored at."""
    widths: tuple[int, ...]
    """Output widths (each compiles the step once); the last is the widest."""
    tokenizer: Any
    """The run's tokenizer (``None`` if it cannot be loaded here)."""
    source: str
    """``data`` or ``config`` (see :func:`run_shapes`)."""


def run_shapes(config: Config) -> RunShapes:
    """What a run of ``config`` compiles: read and encode its data (into a temporary folder) and choose its
    widths exactly as ``icot train`` does. When the training data or the tokenizer is not on this host
    (the hub is never asked), fall back to ``data.max_length`` for the stored width and
    ``train.max_len_train`` (else ``data.max_length``) for the output width."""
    import tempfile
    from pathlib import Path

    from icot_jax import build

    t, d = config.train, config.data
    tokenizer = _local_tokenizer(config)
    generated = d.generate_digits and not d.train
    if tokenizer is None or not (generated or Path(d.train).is_file()):
        stored = d.max_length
        return RunShapes(stored, (min(t.max_len_train or stored, stored),), tokenizer, "config")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(str(Path(tmp) / "tokenizer"))  # build_data reads it from there
        data = build.build_data(config, Path(tmp))
    curriculum = build.build_curriculum(config, len(data.train))
    widths = build.build_widths(config, curriculum, build.build_loader(config, data.train))
    return RunShapes(int(data.train.buckets[-1]), widths.buckets, data.tokenizer, "data")


def _local_tokenizer(config: Config):
    """The run's tokenizer if this host has it (built in, a folder, or the Hugging Face cache), else None."""
    from icot_jax.data.tokenize import build_builtin_tokenizer, load_tokenizer

    if config.data.tokenizer == "builtin":
        return build_builtin_tokenizer()
    try:
        return load_tokenizer(config.data.tokenizer, local_files_only=True)
    except OSError:
        return None


def abstract_batch(batch_size: int, length: int) -> tuple[dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a batch and its ``n_remove`` (the keys and dtypes the train step reads)."""
    import jax
    import numpy as np

    from icot_jax.train.step import BATCH_KEYS

    shapes = {"input_ids": (batch_size, length), "seps": (batch_size, 3), "example_mask": (batch_size,)}
    batch = {key: jax.ShapeDtypeStruct(shapes[key], np.dtype(dtype)) for key, dtype in BATCH_KEYS.items()}
    return batch, jax.ShapeDtypeStruct((batch_size,), np.int32)


def compile_train_step(config: Config, slice_name: str, *, config_name: str = "") -> AotReport:
    """Compile ``config``'s train step for the TPU slice ``slice_name`` and measure it (see module docs)."""
    import jax

    from icot_jax import build, sharding
    from icot_jax.train.step import optimizer_for

    tpu = tpu_slice(slice_name)
    setup = sharding.setup(config.mesh, tpu.devices())
    t = config.train
    build.check_batch_sizes(config, setup, evaluation=False)  # the step only: evaluation is not compiled here
    shapes = run_shapes(config)
    graphdef, state, hf_config = build.build_state(config, shapes.tokenizer, setup, optimizer_for(t), abstract=True)
    pad_id = hf_config.eos_token_id if isinstance(hf_config.eos_token_id, int) else 0
    step = build.build_step(config, graphdef, state, setup, pad_id=pad_id)
    width = shapes.widths[-1]
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    report = AotReport(
        topology=tpu.name, config=config_name or config.name, mesh=dict(setup.mesh.shape), batch_size=t.batch_size,
        seq_len=width, accumulate_steps=t.accumulate_steps, remat=config.mesh.remat, num_params=num_params,
        hbm_bytes_per_device=tpu.generation.hbm_bytes, fits=False, scan_layers=config.mesh.scan_layers,
        model_flops_per_device=6 * num_params * t.batch_size * width / tpu.chips, stored_width=shapes.stored_width,
        widths=list(shapes.widths), shapes_from=shapes.source, vocab_size=hf_config.vocab_size)
    start = time.perf_counter()
    try:
        compiled = step.lower(state, *abstract_batch(t.batch_size, shapes.stored_width), width).compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        report.error = str(err).strip().splitlines()[0]
        return report
    report.compile_seconds = time.perf_counter() - start
    _measure(report, compiled)
    return report


def _measure(report: AotReport, compiled) -> None:
    memory = compiled.memory_analysis()
    report.argument_bytes = memory.argument_size_in_bytes
    report.output_bytes = memory.output_size_in_bytes
    report.alias_bytes = memory.alias_size_in_bytes
    report.temp_bytes = memory.temp_size_in_bytes
    report.bytes_per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                               - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    report.fits = report.bytes_per_device <= report.hbm_bytes_per_device
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX returned one dict per program
    # XLA counts a loop body once; the accumulation loop runs accumulate_steps times (the optimizer update,
    # outside the loop, is then overcounted, by ~10 FLOPs per parameter against 6 per parameter per token).
    flops = float(cost["flops"]) * report.accumulate_steps if cost and "flops" in cost else None
    report.flops_per_device = flops
