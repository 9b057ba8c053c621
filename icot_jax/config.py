"""Run configuration: typed dataclasses, YAML files and ``key=value`` command-line overrides.

A config file mirrors the dataclasses below section by section::

    name: mult4x4_gpt2_small_icot
    model: {hf: gpt2}
    data: {train: data/4_by_4_mult/train.txt, valid: ../shared/data/reference/4_by_4_mult/valid.txt}
    train: {epochs: 200, batch_size: 32, lr: 5.0e-5, remove_per_epoch: 8}

Every key is checked: an unknown key is an error naming the file, the dotted key and the closest valid
key. A key with a fixed set of values is annotated with one of the ``Literal`` aliases below, the only
list of its allowed values (other modules read it with ``typing.get_args``). Overrides use the same dotted
keys (``train.lr=1e-4``); values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from icot_jax.errors import UserError

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
"""The built-in default job (``icot demo``, ``make demo``): a CPU demo of internalization."""


Mode = Literal["icot", "explicit", "no_cot"]
"""``train.mode``: stepwise internalization, never remove the CoT, or remove all of it from the start."""
RemovalSide = Literal["left", "right"]
"""``train.removal_side``: which end of the CoT is removed first."""
JoinMode = Literal["reference", "segments"]
"""``data.join``: tokenize the reference's full string, or each segment alone joined with EOS ids."""
ErrorOrSkip = Literal["error", "skip"]
"""``data.too_long`` and ``data.on_malformed``: stop with an error naming the example, or drop it."""
DType = Literal["float32", "bfloat16"]
"""``model.dtype`` and ``model.param_dtype``."""
Remat = Literal["none", "full", "dots"]
"""``mesh.remat``: no rematerialisation, recompute each block, or save only matmul outputs."""
ScheduleKind = Literal["fixed", "adaptive"]
"""``train.schedule``: Δ tokens per epoch (the reference), or advance once the model has recovered."""
AdaptiveSignal = Literal["token_accuracy", "answer_token_accuracy", "val_accuracy"]
"""``train.adaptive_signal``: the metric the adaptive schedule judges recovery on (two training metrics, or
validation exact match)."""
LrDecay = Literal["none", "after_removal"]
"""``train.lr_decay``: a constant LR (the reference), or a linear decay once no CoT is left to remove."""


class ConfigError(UserError):
    """A config file or override is invalid; the message names the file and the key."""


@dataclasses.dataclass
class ModelConfig:
    """Which network to train and in which precision."""

    hf: str | None = None
    """HF hub name or local folder (config.json + safetensors). With ``from_scratch`` only its config is used."""
    from_scratch: bool = False
    """Random initialisation from the config alone (the reference's ``--reinitialize_weights``)."""
    family: str = "gpt2"
    """``model_type`` used when ``hf`` is empty and the model is built from ``overrides`` alone."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fields set on the HF config before building (e.g. ``n_layer: 2`` for a tiny model)."""
    dtype: DType = "float32"
    """Compute dtype: ``float32`` or ``bfloat16``."""
    param_dtype: DType = "float32"
    """Parameter (and optimizer state) dtype; ``bfloat16`` here is the paper's pure-bf16 mode."""


@dataclasses.dataclass
class DataConfig:
    """Where the examples come from and how they become fixed-shape arrays."""

    train: str | None = None
    valid: str | None = None
    test: str | None = None
    tokenizer: str = "builtin"
    """HF tokenizer name or folder, or ``builtin`` (digits/operators, word level)."""
    join: JoinMode = "reference"
    """``reference`` tokenizes the reference's full string; ``segments`` joins segments with EOS ids."""
    max_length: int = 1024
    """Longest encoded example accepted (see ``too_long``)."""
    too_long: ErrorOrSkip = "error"
    """Policy for longer examples: ``error`` or ``skip``."""
    on_malformed: ErrorOrSkip = "error"
    """Policy for malformed lines: ``error`` or ``skip``."""
    buckets: list[int] = dataclasses.field(default_factory=list)
    """Padded lengths; empty means one bucket at the longest example (one compilation)."""
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    generate_digits: int | None = None
    """If set and ``train`` is missing, generate K×K multiplication data into the run directory."""
    generate_train: int = 4000
    generate_valid: int = 200
    generate_seed: int = 0


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and the internalization curriculum (reference flag names in brackets)."""

    mode: Mode = "icot"
    """``icot`` (stepwise internalization), ``explicit`` (never remove), ``no_cot`` (remove all)."""
    epochs: int = 1
    batch_size: int = 32
    accumulate_steps: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    remove_per_epoch: float = 8.0
    """Δ: CoT tokens removed per epoch [remove_per_epoch]."""
    removal_smoothing_lambda: float = 4.0
    """λ of the offset distribution; ``.inf`` disables smoothing."""
    removal_side: RemovalSide = "left"
    pretrain_epochs: int = 0
    remove_start_from: int = 0
    remove_all_when_remove_beyond: float = math.inf
    reset_optimizer: bool = True
    schedule: ScheduleKind = "fixed"
    """``fixed``: Δ tokens per epoch (the reference). ``adaptive``: the next token goes once the training
    token accuracy has recovered from the last removal (``icot_jax.adaptive``, docs/method.md); Δ then only
    guides the choice of output widths. The ``adaptive_*`` keys are its parameters."""
    adaptive_window: int = 4
    """Running mean of the signal over this many readings: logged batches (``log_every_steps`` apart), or
    evaluations for ``val_accuracy``."""
    adaptive_recovery: float = 0.98
    """Recovered: that mean reaches this fraction of the best level it had just before any removal."""
    adaptive_min_steps: int = 200
    """Steps at each count before it may advance."""
    adaptive_max_steps: int = 3000
    """Steps at each count after which it advances, recovered or not."""
    adaptive_max_tokens_per_advance: int = 1
    """Tokens one advance may remove: an immediate recovery doubles the last advance, up to this."""
    adaptive_signal: AdaptiveSignal = "token_accuracy"
    """What recovery is judged on: ``token_accuracy`` (every target: CoT and answer) or
    ``answer_token_accuracy`` (the answer's targets alone, closer to exact match; the train step then
    also computes it), or ``val_accuracy``: validation exact match by greedy generation with the current
    count removed, read at each evaluation (set ``eval.every_steps``; needs a validation split)."""
    lr_decay: LrDecay = "none"
    """``none``: the LR stays constant (the reference). ``after_removal``: from the first batch whose
    scheduled count removes every CoT token (all of them in ``no_cot`` mode), the LR falls linearly to
    nothing by the run's last batch, so the run ends on settled weights rather than wherever a constant
    LR leaves them (not in the reference; docs/method.md)."""
    warmup_steps: int = 0
    """Linear LR warm-up over this many updates, restarted by every optimizer reset (0: the reference's
    constant LR; not in the reference)."""
    keep_position: bool = False
    random_position_shift: int = 0
    """Training only: shift each example's position ids by a random offset in [0, N] (not in the
    reference; helps small from-scratch models with learned positions survive removal). 0: off."""
    max_len_train: int | None = None
    """Skip a batch whose post-removal length exceeds this [max_len_train]; also the widest output width."""
    length_buckets: list[int] = dataclasses.field(default_factory=list)
    """Widths the rows are compacted into after removal (each compiles the step once); empty: chosen from
    the data, at most 8 multiples of ``length_multiple`` (see ``icot_jax.train.widths``)."""
    length_multiple: int = 8
    """Automatic widths are multiples of this (128 suits TPU matrix units)."""
    seed: int = 1234


@dataclasses.dataclass
class EvalConfig:
    """Validation and test evaluation."""

    every_epochs: int = 1
    every_steps: int | None = None
    """Also evaluate every N steps (useful for short CPU runs); ``None`` = epochs only."""
    batch_size: int = 32
    max_new_tokens: int = 800


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpointing."""

    every_steps: int = 1000
    keep: int = 2
    """How many of the most recent checkpoints to keep (the best one is kept in addition)."""


@dataclasses.dataclass
class MeshConfig:
    """Device mesh with axes (data, fsdp, tensor); one size may be -1 (filled from the device count)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    """Data-parallel replicas across slices (DCN); the ICI sizes above are per slice."""
    remat: Remat = "none"
    """Activation rematerialisation: ``none``, ``full`` (recompute each block) or ``dots`` (save matmuls)."""
    scan_layers: bool = False
    """Run the transformer blocks under one ``jax.lax.scan`` in the training/evaluation forward pass: one
    compiled block instead of ``num_layers``. Parameter paths (checkpoints, Hugging Face key maps, sharding)
    are unchanged: the per-block parameters are stacked inside the step. KV-cached decoding is not scanned.
    Composes with ``remat``. See ``docs/scaling.md``."""
    materialize_cotangents: bool = True
    """CPU only: pass each projection's output cotangent through a conditional so that XLA:CPU computes it
    once instead of recomputing the residual stream's backward chain inside every weight-gradient copy
    (tiny GPT-2 train steps 1.04-1.67x faster side by side on a loaded CPU, the same gradients bit for
    bit). GPU and TPU programs are unchanged either way. See ``docs/method.md``."""


@dataclasses.dataclass
class Config:
    """A complete training run."""

    name: str = "run"
    run_dir: str | None = None
    """Output folder; default ``runs/<name>/<timestamp>``."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    log_every_steps: int = 10


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _check_choice(value: Any, allowed: tuple, key: str, where: str) -> Any:
    """``value`` if it is one of ``allowed`` (a ``Literal``'s values), else an error that lists them."""
    if value in allowed:
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{where}: key '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}{hint}")


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check ``value`` against a field annotation, converting ints to floats and '.inf' strings."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return _check_choice(value, args, key, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python's float() accepts.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}") from None
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
    return value


def _build(cls, raw: dict, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            raise _unknown_key(dotted, list(fields), where)
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, where, dotted + ".")
        else:
            kwargs[key] = _coerce(value, hints[key], dotted, where)
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str], where: str = "command line") -> dict:
    """Return a copy of ``raw`` with ``a.b=value`` overrides applied (values parsed as YAML scalars)."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where}: override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        cls, node = Config, raw
        for depth, part in enumerate(parts):
            fields = _fields(cls)
            if part not in fields:
                raise _unknown_key(".".join(parts[: depth + 1]), list(fields), where)
            hint = typing.get_type_hints(cls)[part]
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(text) if text.strip() else None
            elif dataclasses.is_dataclass(hint):
                node = node.setdefault(part, {})
                cls = hint
            elif hint == dict[str, Any]:
                node.setdefault(part, {})[".".join(parts[depth + 1:])] = yaml.safe_load(text)
                break
            else:
                raise ConfigError(f"{where}: key '{part}' in '{key}' is not a section")
    return raw


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def _check_choices(node: Any, where: str, prefix: str = "") -> None:
    """Check every ``Literal`` field of ``node`` and its sections (a config made in code skipped ``_coerce``)."""
    hints = typing.get_type_hints(type(node))
    for field in dataclasses.fields(node):
        value, hint = getattr(node, field.name), hints[field.name]
        if dataclasses.is_dataclass(hint):
            _check_choices(value, where, f"{prefix}{field.name}.")
        elif typing.get_origin(hint) is Literal:
            _check_choice(value, typing.get_args(hint), prefix + field.name, where)


def adaptive_problem(window: int, recovery: float, min_steps: int, max_steps: int,
                     max_tokens_per_advance: int) -> tuple[str, str] | None:
    """``(parameter, what it must be)`` for the first invalid parameter of the adaptive schedule's rule
    (:class:`icot_jax.adaptive.AdaptiveRule`), else ``None``."""
    checks = (("window", window >= 1, ">= 1"), ("recovery", 0 < recovery <= 1, "a fraction in (0, 1]"),
              ("min_steps", min_steps >= 1, ">= 1"), ("max_steps", max_steps >= min_steps, ">= min_steps"),
              ("max_tokens_per_advance", max_tokens_per_advance >= 1, ">= 1"))
    return next(((name, expected) for name, ok, expected in checks if not ok), None)


def _check_adaptive(config: Config, where: str) -> None:
    train = config.train
    d = config.data
    has_valid = bool(d.valid or (d.generate_digits and not d.train and d.generate_valid))  # as build_data reads it
    if train.schedule == "adaptive" and train.adaptive_signal == "val_accuracy" and not has_valid:
        raise ConfigError(f"{where}: key 'train.adaptive_signal' is 'val_accuracy' but the run has no validation "
                          "split: set 'data.valid' (a file) or 'data.generate_valid' (> 0)")
    problem = adaptive_problem(train.adaptive_window, train.adaptive_recovery, train.adaptive_min_steps,
                               train.adaptive_max_steps, train.adaptive_max_tokens_per_advance)
    if problem is not None:
        key, expected = f"adaptive_{problem[0]}", problem[1]
        raise ConfigError(f"{where}: key 'train.{key}' is {getattr(train, key)!r}; expected {expected}")


def validate(config: Config, where: str = "config") -> Config:
    """Check values that one field's type alone cannot (ranges, fields that depend on each other) and the
    ``Literal`` fields of a config made in code; raise ``ConfigError`` naming the key."""
    _check_choices(config, where)
    positive = {
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "train.accumulate_steps": config.train.accumulate_steps,
        "eval.batch_size": config.eval.batch_size,
        "data.max_length": config.data.max_length,
        "checkpoint.every_steps": config.checkpoint.every_steps,
        "checkpoint.keep": config.checkpoint.keep,
        "train.length_multiple": config.train.length_multiple,
        **{f"train.length_buckets[{i}]": b for i, b in enumerate(config.train.length_buckets)},
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where}: key '{key}' must be >= 1, got {value}")
    if config.train.batch_size % config.train.accumulate_steps:
        raise ConfigError(
            f"{where}: train.batch_size ({config.train.batch_size}) must be divisible by "
            f"train.accumulate_steps ({config.train.accumulate_steps})"
        )
    if config.train.max_len_train is not None and config.train.max_len_train < 1:
        raise ConfigError(f"{where}: key 'train.max_len_train' must be >= 1 or null, got {config.train.max_len_train}")
    if config.train.random_position_shift < 0:
        raise ConfigError(f"{where}: key 'train.random_position_shift' must be >= 0, got "
                          f"{config.train.random_position_shift}")
    if config.train.warmup_steps < 0:
        raise ConfigError(f"{where}: key 'train.warmup_steps' must be >= 0, got {config.train.warmup_steps}")
    if config.train.remove_per_epoch <= 0:
        raise ConfigError(f"{where}: key 'train.remove_per_epoch' must be > 0")
    if config.train.removal_smoothing_lambda <= 0:
        raise ConfigError(f"{where}: key 'train.removal_smoothing_lambda' must be > 0 (use .inf to disable)")
    _check_adaptive(config, where)
    if not (config.model.hf or config.model.from_scratch):
        raise ConfigError(f"{where}: set 'model.hf' (a checkpoint) or 'model.from_scratch: true'")
    if not (config.data.train or config.data.generate_digits):
        raise ConfigError(f"{where}: set 'data.train' (a file) or 'data.generate_digits' (built-in data)")
    return config


def from_dict(raw: dict, where: str = "config") -> Config:
    """Build and validate a ``Config`` from a nested dict."""
    return validate(_build(Config, raw, where), where)


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key at every depth; any other value replaces the base's."""
    merged = _deep_copy(base)
    for key, value in top.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file, resolving ``base: other.yaml`` (relative to the file) by deep merge."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a file name, got {base!r}")
    inherited = _read_yaml(path.parent / base, seen + (path.resolve(),))
    inherited.pop("name", None)  # a run is named by its own file (its `name`, else its stem), never its base
    return _merge(inherited, raw)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate.

    A file may start from another with ``base: other.yaml`` (path relative to the file). Mappings merge key
    by key at every depth, sections and ``model.overrides`` alike, so a file states only what it changes;
    lists and scalars replace the base's. ``name`` is the file's own (default: its stem), never its base's.
    An override ``a.b=value`` replaces the value at that key, a mapping included (``model.overrides={...}``
    is the whole mapping; ``model.overrides.n_layer=4`` one entry of it).
    Errors name the file (or "command line") and the offending dotted key.
    """
    raw: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        raw = _read_yaml(Path(path))
        raw.setdefault("name", Path(path).stem)
        _build(Config, raw, where)  # report unknown keys of the file itself before overrides
    raw = apply_overrides(raw, list(overrides))
    return from_dict(raw, where if not overrides else f"{where} (with overrides)")


def to_dict(config: Config) -> dict:
    """The config as plain nested dicts (``inf`` kept as a float), e.g. to save as YAML."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable with ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
