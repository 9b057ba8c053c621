"""Hugging Face checkpoints in and out: ``config.json`` + safetensors <-> the NNX models of this package.

Each family folder (``gpt2/``, ``llama/``) declares in its ``params.py`` how the checkpoint tensors of its
``model_type``s map onto our parameters (a :class:`~icot_jax.models.keymap.Family` with its
:class:`~icot_jax.models.keymap.TensorRule` list) and how a transformers config becomes the model's config.
This module dispatches on ``model_type`` and does the rest, the same for every family. Loading streams the
checkpoint tensor by tensor (``safetensors.safe_open``), converts each to our layout and dtype on the host
and places it straight into its sharding, so the host never holds more than one tensor (plus its converted
copy) at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from icot_jax.errors import MissingPathError, UserError
from icot_jax.models.common import CausalLM, DTypeLike
from icot_jax.models.gpt2 import params as gpt2_params
from icot_jax.models.keymap import Family, TensorRule
from icot_jax.models.llama import params as llama_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size

ShardingsArg = (jax.sharding.Sharding | nnx.State | Mapping
                | Callable[[str, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None)


class CheckpointMismatchError(UserError):
    """A checkpoint's tensors do not match the model its config describes."""


# ----------------------------------------------------------------------------------------- registry

# Each family folder declares its Hugging Face ``model_type``s in ``params.FAMILIES``.
FAMILIES: dict[str, Family] = {family.model_type: family
                               for family in (*gpt2_params.FAMILIES, *llama_params.FAMILIES)}


HFConfigLike = transformers.PretrainedConfig | Mapping | str | Path


def family_for(hf_config: transformers.PretrainedConfig) -> Family:
    """The registered family of ``hf_config.model_type``."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def as_hf_config(config: HFConfigLike) -> transformers.PretrainedConfig:
    """A transformers config from a config object, a ``config.json``-style dict or a checkpoint folder."""
    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        fields = dict(config)
        return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    return transformers.AutoConfig.from_pretrained(str(config))


def _build(model_class, model_config, dtype, param_dtype, key) -> CausalLM:
    return model_class(model_config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(key))


def _random_state(model_class, model_config, dtype, param_dtype, key) -> nnx.State:
    return nnx.state(_build(model_class, model_config, dtype, param_dtype, key))


# Initialising eagerly would compile every random op separately; one jitted function, cached per
# architecture (the key is traced), is much faster.
_random_state_jit = jax.jit(_random_state, static_argnums=(0, 1, 2, 3))


def from_config(hf_config: HFConfigLike, *, dtype: DTypeLike = "float32", param_dtype: DTypeLike = "float32",
                seed: int = 0, shardings: ShardingsArg = None) -> CausalLM:
    """A randomly initialised model (Hugging Face's init scheme), for training from scratch.

    ``hf_config``: a transformers config, a ``config.json``-style dict or a checkpoint folder. ``shardings``
    (as for :func:`load_pretrained`) become the ``out_shardings`` of the jitted initialisation, so a large
    model is created directly in its sharded layout.
    """
    hf_config = as_hf_config(hf_config)
    family = family_for(hf_config)
    static = (family.model_class, family.model_config(hf_config), jnp.dtype(dtype), jnp.dtype(param_dtype))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: _build(*static, jax.random.key(0))))
    if shardings is None:
        init = _random_state_jit
    else:
        init = jax.jit(_random_state, static_argnums=(0, 1, 2, 3),
                       out_shardings=_shardings_tree(shardings, abstract_state))
    return nnx.merge(graphdef, init(*static, jax.random.key(seed)))


# ------------------------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A rule expanded for one layer, with our parameters' shapes."""

    rule: TensorRule
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.rule.hf_shape(self.shapes)


def _dotted(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


def _param_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}


def _plan(family: Family, params: Mapping[str, Any], num_layers: int) -> dict[str, _Entry]:
    """Checkpoint key -> entry, for every rule whose parameters the model has (no bias when the config has
    none, no ``lm_head`` when tied); every parameter must be covered by exactly one rule."""
    plan = {}
    for rule in family.rules:
        for i in range(num_layers) if "{i}" in rule.hf_key else [0]:
            paths = tuple(p.format(i=i) for p in rule.params)
            if all(p in params for p in paths):
                plan[rule.hf_key.format(i=i)] = _Entry(rule, paths, tuple(tuple(params[p].shape) for p in paths))
    covered = [p for entry in plan.values() for p in entry.params]
    if sorted(covered) != sorted(params):
        raise RuntimeError(f"{family.model_type} key map out of sync with the model: parameters without a rule "
                           f"{sorted(set(params) - set(covered))}")
    return plan


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A local checkpoint folder, or a Hugging Face Hub repository downloaded with ``snapshot_download``."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path}: expected a checkpoint folder (config.json + *.safetensors)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_name),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub raises many types (offline, not found, gated); all mean the same here
        raise MissingPathError(f"{str(path_or_name)!r} is not a local folder and could not be fetched from "
                                f"the Hugging Face Hub: {err}") from err


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it."""
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    if (path / SINGLE_FILE).exists():
        with safe_open(path / SINGLE_FILE, framework="flax") as f:
            return {key: path / SINGLE_FILE for key in f.keys()}
    raise MissingPathError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")


def _canonical_key(key: str, plan: Mapping[str, _Entry], base_prefix: str) -> str:
    """The key as our key maps spell it: checkpoints saved from the base model (e.g. the hub's
    openai-community/gpt2) lack the ``transformer.`` / ``model.`` prefix."""
    return base_prefix + key if key not in plan and base_prefix + key in plan else key


def _by_file(files: Mapping[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for key, file in files.items():
        grouped.setdefault(file, []).append(key)
    return grouped


def _check(path: Path, family: Family, plan: Mapping[str, _Entry], files: Mapping[str, Path],
           canonical: Mapping[str, str], tied: bool) -> None:
    """Raise one :class:`CheckpointMismatchError` listing every missing, unexpected or misshapen tensor."""
    ignored = family.ignored + ((r"^lm_head\.weight$",) if tied else ())
    unexpected, mismatched = [], []
    for file, keys in _by_file(files).items():
        with safe_open(file, framework="flax") as f:
            for key in keys:
                shape = tuple(f.get_slice(key).get_shape())
                entry = plan.get(canonical[key])
                if entry is None:
                    if not any(re.search(pattern, canonical[key]) for pattern in ignored):
                        unexpected.append(f"    {key}  shape {shape}  in {file.name}")
                elif shape != entry.hf_shape:
                    mismatched.append(f"    {key}  expected {entry.hf_shape}, found {shape}  in {file.name}")
    present = set(canonical.values())
    missing = [f"    {key}  expected shape {entry.hf_shape}" for key, entry in plan.items() if key not in present]
    if missing or unexpected or mismatched:
        sections = [(f"  {title} ({len(lines)}):", lines) for title, lines in
                    (("missing tensors", missing), ("unexpected tensors", unexpected),
                     ("shape mismatches", mismatched)) if lines]
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the {family.model_type} model its config.json describes:\n"
            + "\n".join(line for title, lines in sections for line in [title, *lines]))


def _sharding_lookup(shardings: ShardingsArg) -> Callable[[str, jax.ShapeDtypeStruct], Any]:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return lambda path, aval: shardings
    if isinstance(shardings, Mapping):
        leaves = jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.sharding.Sharding)))[0]
        by_path = {_dotted(p): (leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf) for p, leaf in leaves}

        def lookup(path, aval):
            if path not in by_path:
                raise KeyError(f"shardings has no entry for parameter {path!r}")
            return by_path[path]

        return lookup
    if callable(shardings):
        return shardings
    raise TypeError(f"shardings must be None, a Sharding, a pytree of Shardings or a callable, got {shardings!r}")


def _shardings_tree(shardings: ShardingsArg, state: nnx.State) -> nnx.State:
    """``shardings`` in any accepted form as a tree shaped like ``state`` (for ``jit`` ``out_shardings``)."""
    lookup = _sharding_lookup(shardings)
    return jax.tree_util.tree_map_with_path(lambda path, v: v.replace(lookup(_dotted(path), v.get_value())),
                                            state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _host_device() -> jax.Device | None:
    """Where safetensors materialises tensors: the host CPU, so accelerator memory only sees the sharded result."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def _place(value: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(value)
    # Each process materialises only the shards its devices hold.
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_pretrained(path_or_name: str | Path, *, dtype: DTypeLike = "float32", param_dtype: DTypeLike = "float32",
                    shardings: ShardingsArg = None) -> tuple[CausalLM, transformers.PretrainedConfig]:
    """Load a Hugging Face causal LM (``gpt2``, ``llama``, ``mistral``, ``phi3``) into our NNX model.

    Args:
      path_or_name: a local folder with ``config.json`` and ``model.safetensors`` (or sharded files with
        ``model.safetensors.index.json``), or a hub repository name (downloaded when not a local folder).
      dtype: compute dtype; param_dtype: storage dtype (each tensor is cast on the host).
      shardings: where each parameter goes: None (default device), one ``jax.sharding.Sharding`` for all, a
        pytree of shardings shaped like ``nnx.state(model, nnx.Param)`` (e.g. from
        ``nnx.get_named_sharding``), or a callable ``(dotted_path, ShapeDtypeStruct) -> Sharding``.

    Returns:
      ``(model, hf_config)``; keep ``hf_config`` for :func:`export_pretrained`.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or misshapen tensor.
    """
    path = resolve_checkpoint(path_or_name)
    hf_config = transformers.AutoConfig.from_pretrained(path)
    family = family_for(hf_config)
    model_config = family.model_config(hf_config)
    abstract = nnx.eval_shape(lambda: family.model_class(model_config, dtype=dtype, param_dtype=param_dtype,
                                                         rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = _param_variables(state)
    plan = _plan(family, {p: v.get_value() for p, v in variables.items()}, model_config.num_layers)
    files = _checkpoint_files(path)
    canonical = {key: _canonical_key(key, plan, family.base_prefix) for key in files}
    _check(path, family, plan, files, canonical, model_config.tie_word_embeddings)

    sharding_for = _sharding_lookup(shardings)
    with jax.default_device(_host_device()):
        for file, keys in _by_file(files).items():
            with safe_open(file, framework="flax") as f:
                for key in keys:
                    entry = plan.get(canonical[key])
                    if entry is None:
                        continue  # an ignored tensor (checked above)
                    values = entry.rule.to_params(np.asarray(f.get_tensor(key)), entry.shapes)
                    for param_path, value in zip(entry.params, values):
                        aval = variables[param_path].get_value()
                        variables[param_path].set_value(
                            _place(value.astype(aval.dtype), sharding_for(param_path, aval)))
    return nnx.merge(graphdef, state), hf_config


# ------------------------------------------------------------------------------------------- export


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _shard_groups(plan: Mapping[str, _Entry], itemsizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive checkpoint keys grouped into files of at most ``max_bytes`` (one tensor may exceed it)."""
    groups, size = [[]], 0
    for key, entry in plan.items():
        nbytes = math.prod(entry.hf_shape) * itemsizes[key]
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def export_pretrained(model: CausalLM, hf_config: transformers.PretrainedConfig, out_dir: str | Path,
                      tokenizer=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``config.json`` + safetensors (+ the tokenizer) that ``AutoModelForCausalLM.from_pretrained``
    loads. Parameters are written in their storage dtype, one file (at most ``max_shard_bytes``) at a time.
    Every process must call this (arrays sharded across hosts are gathered); process 0 writes.
    """
    hf_config = as_hf_config(hf_config)
    family = family_for(hf_config)
    variables = _param_variables(nnx.state(model, nnx.Param))
    plan = _plan(family, {p: v.get_value() for p, v in variables.items()}, model.config.num_layers)
    itemsizes = {key: variables[entry.params[0]].get_value().dtype.itemsize for key, entry in plan.items()}
    groups = _shard_groups(plan, itemsizes, max_shard_bytes)
    names = ([SINGLE_FILE] if len(groups) == 1 else
             [f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors" for n in range(len(groups))])
    writer = jax.process_index() == 0
    out_dir = Path(out_dir)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
            stale.unlink(missing_ok=True)  # files of an earlier export would mix with these
    for name, keys in zip(names, groups):
        tensors = {key: plan[key].rule.to_tensor([_to_host(variables[p].get_value()) for p in plan[key].params])
                   for key in keys}
        if writer:
            save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    if not writer:
        return out_dir
    if len(groups) > 1:
        total = sum(math.prod(plan[key].hf_shape) * itemsizes[key] for key in plan)
        weight_map = {key: name for name, keys in zip(names, groups) for key in keys}
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
    config = copy.deepcopy(hf_config)
    for field, value in family.export_config(model.config).items():
        setattr(config, field, value)
    config.dtype = str(jnp.dtype(next(iter(variables.values())).get_value().dtype))
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
