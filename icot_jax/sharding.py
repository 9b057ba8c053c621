"""Meshes, sharding rules, placement of batches and multi-host helpers (sharded train-state creation is
in :mod:`icot_jax.build`).

The sharding story in one place:

* a mesh with axes ``(data, fsdp, tensor)`` built from ``config.mesh`` (:func:`make_mesh`);
* :data:`LOGICAL_RULES` map the logical axis names every parameter carries (``vocab``, ``embed``, ``mlp``,
  ``heads``, ...) onto mesh axes; a mesh axis that does not divide a dimension is dropped for that
  parameter, which is then replicated along it (:func:`shardings`);
* batches are split along ``(data, fsdp)`` (:data:`BATCH_AXES`); each host loads only the rows its
  devices hold (:meth:`Setup.host_rows`) and :func:`put_batch` assembles the global arrays;
* :mod:`icot_jax.build` creates the whole train state (parameters *and* optimizer moments) in one
  ``jax.jit`` with these ``out_shardings``, so no array ever exists unsharded on one device.

Typical use in a training loop::

    initialize_distributed()                      # every host, before anything touches devices
    setup = sharding.setup(config.mesh)
    graphdef, state = build.init_state(setup, make_model, optimizer, seed=config.train.seed)
    step = TrainStep(graphdef, optimizer, step_config, state_sharding=setup.shardings(state),
                     batch_sharding=setup.batch_sharding)
    loader = BatchLoader(data, batch_size, **setup.host_rows(batch_size))
    state, metrics = step(state, *setup.put(batch, n_remove), widths.width(plan.batch_length))
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from icot_jax.config import MeshConfig
from icot_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
"""Mesh axis names, outermost first: data-parallel replicas, fully-sharded data parallel, tensor parallel."""

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch dimension is split over (FSDP shards the batch like data parallelism does)."""

MeshAxes = str | tuple[str, ...] | None

LOGICAL_RULES: dict[str, MeshAxes] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "positions": None,
    "norm": None,
}
"""Logical axis name -> mesh axes. ``embed`` (every weight matrix has it) carries FSDP; the axes that
Megatron-style tensor parallelism splits (vocabulary, MLP width, heads) carry ``tensor``. Every name the
models use must appear here: an unknown name is an error, never silently replicated."""


# ------------------------------------------------------------------------------------------------ mesh


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """ICI sizes ``(data, fsdp, tensor)`` of one slice, with a ``-1`` filled from the device count.

    ``num_devices`` counts every slice; ``config.dcn_data`` slices each hold ``num_devices / dcn_data``.
    """
    if config.dcn_data < 1 or num_devices % config.dcn_data:
        raise UserError(f"mesh.dcn_data={config.dcn_data} must be >= 1 and divide the {num_devices} devices")
    per_slice = num_devices // config.dcn_data
    sizes = {"data": config.data, "fsdp": config.fsdp, "tensor": config.tensor}
    unknown = [name for name, size in sizes.items() if size == -1]
    bad = [f"mesh.{name}={size}" for name, size in sizes.items() if size < 1 and size != -1]
    if bad or len(unknown) > 1:
        raise UserError(f"mesh sizes must be >= 1 with at most one -1, got {', '.join(bad) or sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if per_slice % known:
            raise UserError(f"mesh: {per_slice} devices per slice are not divisible by the fixed sizes "
                             f"{sizes} (product {known}) to fill mesh.{unknown[0]}=-1")
        sizes[unknown[0]] = per_slice // known
    if math.prod(sizes.values()) != per_slice:
        raise UserError(f"mesh: data×fsdp×tensor = {sizes} needs {math.prod(sizes.values())} devices per slice, "
                         f"but there are {per_slice} ({num_devices} devices / mesh.dcn_data={config.dcn_data})")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``devices`` (default: all devices of all hosts).

    Within a slice, ``mesh_utils.create_device_mesh`` lays the axes onto the physical ICI torus (tensor
    innermost: it communicates most). With ``dcn_data > 1`` the slices are data-parallel replicas joined
    over the data-centre network, so the mesh's ``data`` axis is ``dcn_data × data``.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici = mesh_shape(config, len(devices))
    if config.dcn_data == 1:
        grid = mesh_utils.create_device_mesh(ici, devices)
    else:
        # Multislice TPU devices carry their slice_index; elsewhere (one "slice", e.g. CPU tests) processes
        # stand in for slices.
        by_process = len({getattr(device, "slice_index", 0) for device in devices}) == 1
        grid = mesh_utils.create_hybrid_device_mesh(ici, (config.dcn_data, 1, 1), devices,
                                                    process_is_granule=by_process)
    return Mesh(grid, MESH_AXES)


# -------------------------------------------------------------------------------------------- shardings


def mesh_spec(logical: PartitionSpec | Sequence[str | None], shape: Sequence[int], mesh: Mesh,
              rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> PartitionSpec:
    """The mesh ``PartitionSpec`` of an array of ``shape`` whose axes have ``logical`` names.

    A mesh axis is kept only if it divides the dimension (after the axes already kept for it), is not
    used by an earlier dimension and has more than one device; otherwise the array is replicated along
    it. E.g. GPT-2's 50257-token vocabulary stays whole on every tensor-parallel device.
    """
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to icot_jax.sharding.LOGICAL_RULES "
                           f"(known: {sorted(rules)})")
        targets = rules[name] if name is not None else None
        targets = (targets,) if isinstance(targets, str) else (targets or ())
        kept = []
        for axis in targets:
            divides = size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0
            if mesh.shape[axis] > 1 and axis not in used and divides:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def shardings(tree: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> Any:
    """A ``NamedSharding`` for every array of ``tree`` (a model state or a whole ``TrainState``).

    NNX variables are sharded by the logical axes they carry (``out_sharding`` metadata); optimizer
    moments built with ``jax.tree.map`` over the parameters carry the same names, so they are sharded
    like their parameters. Everything else (step, counts, RNG key) is replicated. Works on concrete
    arrays and on ``jax.eval_shape`` results alike.
    """
    def sharding_of(leaf):
        if _is_variable(leaf) and leaf.get_metadata("out_sharding", None) is not None:
            value = leaf.get_value()
            return NamedSharding(mesh, mesh_spec(leaf.get_metadata("out_sharding"), value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding_of, tree, is_leaf=_is_variable)


# --------------------------------------------------------------------------------------------- batches


def process_rows(sharding: jax.sharding.Sharding, global_rows: int) -> tuple[int, int]:
    """``(block, num_blocks)``: this process holds rows ``block·n … (block+1)·n - 1`` of a batch sharded by
    ``sharding`` along its first axis, ``n = global_rows / num_blocks``.

    Pass them to the loader as ``process_index`` / ``process_count``: hosts whose devices hold the same
    rows (tensor parallelism across hosts) get the same block.
    """
    slices = sharding.addressable_devices_indices_map((global_rows,)).values()
    rows = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in slices})
    first, last = rows[0][0], rows[-1][1]
    if sum(stop - start for start, stop in rows) != last - first:
        raise ValueError(f"this process's rows {rows} of the batch are not one contiguous block")
    count = last - first
    return first // count, global_rows // count


def put_batch(batch: Mapping[str, np.ndarray], n_remove: np.ndarray, sharding: jax.sharding.Sharding, *,
              whole: bool = False) -> tuple[dict[str, jax.Array], jax.Array]:
    """Global device arrays from this host's rows of a batch and of ``n_remove``.

    Every host passes only its own rows (see :func:`process_rows`), and
    ``jax.make_array_from_process_local_data`` stitches them into arrays of the global batch size sharded
    by ``sharding``. With ``whole=True`` every host passes the entire (identical) batch instead, as
    evaluation does, and keeps the rows its devices hold.
    """
    arrays = {key: np.asarray(value) for key, value in batch.items()} | {"n_remove": np.asarray(n_remove)}
    shapes = {key: value.shape for key, value in arrays.items()} if whole else None
    arrays = jax.make_array_from_process_local_data(sharding, arrays, shapes)
    n_remove = arrays.pop("n_remove")
    return arrays, n_remove


# ------------------------------------------------------------------------------------------- the setup


@dataclasses.dataclass(frozen=True)
class Setup:
    """A mesh and its sharding rules: everything the training loop needs to place state and batches."""

    mesh: Mesh
    rules: Mapping[str, MeshAxes] = dataclasses.field(default_factory=lambda: dict(LOGICAL_RULES))

    @property
    def batch_sharding(self) -> NamedSharding:
        """Rows over ``(data, fsdp)``, every other axis whole."""
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))

    @property
    def batch_divisor(self) -> int:
        """Batch sizes (and micro-batch sizes) must be multiples of this: ``data × fsdp``."""
        return math.prod(self.mesh.shape[axis] for axis in BATCH_AXES)

    def check_batch_size(self, rows: int, key: str) -> None:
        """Raise naming config ``key`` unless ``rows`` splits evenly over the batch axes."""
        if rows % self.batch_divisor:
            raise UserError(f"{key}={rows} rows cannot be split over data×fsdp = {self.batch_divisor} devices "
                             f"(mesh {dict(self.mesh.shape)}); use a multiple of {self.batch_divisor}")

    def shardings(self, tree: Any) -> Any:
        """:func:`shardings` on this mesh."""
        return shardings(tree, self.mesh, self.rules)

    def host_rows(self, global_rows: int) -> dict[str, int]:
        """``process_index`` / ``process_count`` for the data loader (see :func:`process_rows`)."""
        block, count = process_rows(self.batch_sharding, global_rows)
        return {"process_index": block, "process_count": count}

    def put(self, batch: Mapping[str, np.ndarray], n_remove: np.ndarray, *,
            whole: bool = False) -> tuple[dict[str, jax.Array], jax.Array]:
        """:func:`put_batch` with :attr:`batch_sharding`."""
        return put_batch(batch, n_remove, self.batch_sharding, whole=whole)


def setup(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Setup:
    """The :class:`Setup` of ``config.mesh`` over ``devices`` (default: every device of every host)."""
    return Setup(make_mesh(config, devices))


# ------------------------------------------------------------------------------------------ multi-host


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join the other hosts of a multi-host job (call first, before anything touches devices).

    * Explicit arguments, or the environment variables ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of
      process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``: all three are needed.
    * None of them, on a Cloud TPU VM: ``jax.distributed.initialize()`` finds the pod's workers itself.
    * None of them elsewhere: a single-process run; nothing to do.

    Returns whether this process is part of a distributed job.
    """
    if jax.distributed.is_initialized():
        return True
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = {"coordinator_address": address, "num_processes": count, "process_id": index}
    if any(value is not None for value in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise UserError(f"multi-host setup needs coordinator_address, num_processes and process_id "
                             f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing {missing}")
        jax.distributed.initialize(address, count, index)
        return True
    if not _on_cloud_tpu_vm():
        return False
    jax.distributed.initialize()
    return True


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
    """Whether this host is a Cloud TPU VM (where ``jax.distributed.initialize()`` auto-detects the pod).

    JAX records this when it is imported (``jax._src.cloud_tpu_init``, no public equivalent): it checks for
    TPU chips on the PCI bus and for libtpu.
    """
    from jax._src import cloud_tpu_init

    return cloud_tpu_init.running_in_cloud_tpu_vm
