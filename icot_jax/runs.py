"""Opening a finished run: ``open_run(url)`` for ``icot eval``, ``generate``, ``tradeoff`` and ``export-hf``.

``url`` is a run directory of ``icot train`` or a Hugging Face folder (``config.json`` + safetensors +
tokenizer, as ``icot export-hf`` writes it), on local disk or on Cloud Storage (``gs://bucket/...``) alike.
The small files (config, tokenizer, model config; all of an HF folder) are copied with
:meth:`icot_jax.rundir.RunDir.pull` into a temporary folder that is deleted once they are loaded; orbax
reads the checkpoints from the URL directly. Anything else, a half-made run directory included, is a
:class:`icot_jax.errors.UserError` that names the path and says what it lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etils import epath

from icot_jax.checkpoint import RunCheckpoints
from icot_jax.config import Config, JoinMode, RemovalSide, load_config
from icot_jax.errors import MissingPathError, UserError, UserPathError
from icot_jax.rundir import RunDir, is_remote

WHICH = ("best", "latest")
"""The weights of a run directory that :func:`open_run` loads: the best evaluation's or the newest."""

RUN_FILES = ("config.yaml", "tokenizer", "model")
"""What a run directory needs besides its checkpoints: its config, tokenizer and HF model config."""

RUN_PARTS = ("tokenizer", "model", "data", "checkpoints", "best", "lock")
"""Entries that make a folder without ``config.yaml`` a run directory whose setup did not finish."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

EXPORT_INFO_FILE = "icot_jax.json"
"""What ``icot export-hf`` records, beside the HF files, that the weights alone do not say."""

_EXPORT_INFO_KEYS = {"join": typing.get_args(JoinMode), "keep_position": (True, False),
                     "removal_side": typing.get_args(RemovalSide)}


@dataclasses.dataclass(frozen=True)
class OpenedRun:
    """A model ready to evaluate or export, with what is needed to build its prompts."""

    url: str
    """Where it was opened from, as given (a path or a ``gs://`` URL)."""
    model: Any
    tokenizer: Any
    hf_config: Any
    """The model's transformers config (what :func:`icot_jax.models.hf.export_pretrained` writes)."""
    config: Config | None = None
    """The run's ``Config`` for a run directory; None for a Hugging Face folder."""
    which: str | None = None
    """The weights loaded (``best`` or ``latest``; ``latest`` when a run has no best yet); None for an HF folder."""
    step: int | None = None
    """The step of the checkpoint loaded; None for an HF folder."""
    join: str = "reference"
    """How sequences were tokenized in training (``reference`` or ``segments``): prompts must match."""
    keep_position: bool = False
    """Whether training kept removed tokens' positions (``train.keep_position``): from the run config, or
    from the ``icot_jax.json`` that ``icot export-hf`` writes next to an exported folder's weights."""
    removal_side: str = "left"
    """``train.removal_side`` of the training run (same sources as ``keep_position``)."""


def open_run(url: str | Path, *, which: str = "best", dtype: str | None = None,
             join: str | None = None) -> OpenedRun:
    """The model of a run directory (its ``which`` weights) or of a Hugging Face folder, local or ``gs://``.

    ``dtype``: compute and parameter dtype; by default a run's ``model.dtype``/``model.param_dtype`` and
    ``float32`` for an HF folder. ``join`` overrides the tokenization mode; by default a run uses its
    config's, an HF folder the one recorded in its ``icot_jax.json`` (:func:`write_export_info`) and, without
    one, the reference's (``reference``; with the built-in tokenizer both modes give the same ids).

    Raises :class:`UserError` naming ``url`` when it does not exist, is a run directory with no trained
    weights yet (or whose setup did not finish), or is neither a run directory nor an HF folder.
    """
    if which not in WHICH:
        raise UserError(f"which must be one of {list(WHICH)}, got {which!r}")
    with _readable(str(url)) as (source, names):
        if "config.yaml" in names:
            opened = _open_training_run(source, names, which, dtype)
        elif "config.json" in names:
            opened = _open_hf_folder(source, names, dtype or "float32")
        else:
            raise UserError(_what_is_missing(source.url, names))
    return opened if join is None else dataclasses.replace(opened, join=join)


@contextlib.contextmanager
def _readable(url: str) -> Iterator[tuple[RunDir, set[str]]]:
    """``(run directory, names of its top-level entries)``; a remote one is mirrored into a temporary
    folder, deleted on exit (everything is in memory by then)."""
    folder = epath.Path(url)
    if not folder.is_dir():
        error = UserPathError if folder.exists() else MissingPathError
        raise error(f"{url}: {'not a folder' if folder.exists() else 'not found'} (expected a training run "
                    "directory or a Hugging Face folder)")
    names = {entry.name for entry in folder.iterdir()}
    if not is_remote(url):
        yield RunDir(url), names
        return
    with tempfile.TemporaryDirectory(prefix="icot-open-") as mirrors:
        yield RunDir(url, mirror_root=mirrors), names


def _what_is_missing(url: str, names: set[str]) -> str:
    """Why a folder without ``config.yaml`` or ``config.json`` cannot be opened."""
    parts = sorted(names & set(RUN_PARTS))
    if parts:
        return (f"{url} has no trained weights yet: it is a run directory whose setup did not finish (it has "
                f"{', '.join(parts)} but no config.yaml); start the run again with `icot train CONFIG "
                f"run_dir={url}`")
    return (f"{url} is neither a training run directory (config.yaml) nor a Hugging Face folder "
            "(config.json + safetensors)")


def _checkpoint_to_load(url: str, names: set[str], checkpoints: RunCheckpoints, which: str) -> tuple[str, int]:
    """``(which, step)`` of the checkpoint to restore: the best, else the newest full state."""
    steps = {"best": checkpoints.best.latest_step(), "latest": checkpoints.latest_step()}
    lacking = [name for name in RUN_FILES if name not in names]
    if lacking or all(step is None for step in steps.values()):
        reason = f"no {' or '.join(lacking)}" if lacking else "no complete checkpoint in checkpoints/ or best/"
        raise UserError(f"{url} has no trained weights yet ({reason}): the run is still setting up, or stopped "
                        f"before its first checkpoint; resume it with `icot train --resume {url}`")
    if steps[which] is not None:
        return which, steps[which]
    if which == "best":
        return "latest", steps["latest"]
    raise UserError(f"{url} has no full checkpoint in checkpoints/, only best/: open it with which='best' "
                    "(--which best)")


def _open_training_run(source: RunDir, names: set[str], which: str, dtype: str | None) -> OpenedRun:
    """A run directory's weights restored by orbax into a model built from its ``model/`` config."""
    import transformers

    checkpoints = RunCheckpoints(source.url, read_only=True)
    try:
        which, step = _checkpoint_to_load(source.url, names, checkpoints, which)
        source.pull(RUN_FILES)
        config = load_config(source.local / "config.yaml")
        tokenizer = _load_tokenizer(source.local / "tokenizer")
        hf_config = transformers.AutoConfig.from_pretrained(str(source.local / "model"))
        model = _restore_model(checkpoints, config, hf_config, which, step, dtype)
    finally:
        checkpoints.close()
    return OpenedRun(source.url, model, tokenizer, hf_config, config, which, step, join=config.data.join,
                     keep_position=config.train.keep_position, removal_side=config.train.removal_side)


def _restore_model(checkpoints: RunCheckpoints, config: Config, hf_config: Any, which: str, step: int,
                   dtype: str | None):
    """The model of ``hf_config`` with the parameters of checkpoint ``step`` (``best``: params only;
    ``latest``: the params of the full train state)."""
    import jax
    from flax import nnx

    from icot_jax.models import hf
    from icot_jax.train.step import init_train_state, optimizer_for, split_model

    m = config.model
    abstract = nnx.eval_shape(lambda: hf.from_config(hf_config, dtype=dtype or m.dtype,
                                                     param_dtype=dtype or m.param_dtype, seed=0))
    graphdef, params, rest = split_model(abstract)
    if which == "best":
        params, _ = checkpoints.restore_best(params)
    else:
        state_like = jax.eval_shape(lambda: init_train_state(params, rest, optimizer_for(config.train), seed=0))
        params = checkpoints.restore(state_like, step)[0].params
    return nnx.merge(graphdef, params, rest)


def _open_hf_folder(source: RunDir, names: set[str], dtype: str) -> OpenedRun:
    """A Hugging Face folder, with the training details its ``icot_jax.json`` records."""
    from icot_jax.models.hf import load_pretrained

    if not names & set(TOKENIZER_FILES):
        raise UserError(f"{source.url} has no tokenizer (tokenizer.json); export it with its tokenizer")
    source.pull()
    info = read_export_info(source.local)
    model, hf_config = load_pretrained(source.local, dtype=dtype, param_dtype=dtype)
    return OpenedRun(source.url, model, _load_tokenizer(source.local), hf_config,
                     join=info.get("join", "reference"), keep_position=info.get("keep_position", False),
                     removal_side=info.get("removal_side", "left"))


def _load_tokenizer(folder: Path):
    from icot_jax.data.tokenize import load_tokenizer

    return load_tokenizer(folder, local_files_only=True)


def write_export_info(folder: str | Path, run: OpenedRun) -> Path:
    """Write ``icot_jax.json`` into an exported folder: the run's tokenization join mode,
    ``train.keep_position`` and ``train.removal_side`` (what evaluation needs to rebuild its prompts and
    positions), and where it came from (``source``). :func:`open_run` reads it back."""
    source = run.url if is_remote(run.url) else str(Path(run.url).resolve())
    info = {"join": run.join, "keep_position": bool(run.keep_position), "removal_side": run.removal_side,
            "source": source}
    path = Path(folder) / EXPORT_INFO_FILE
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def read_export_info(folder: str | Path) -> dict:
    """The ``icot_jax.json`` of an exported folder, checked; ``{}`` when there is none (an HF folder not
    written by ``icot export-hf``). Raises :class:`UserError` naming the file and key when it is malformed."""
    path = Path(folder) / EXPORT_INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(info).__name__}")
    for key, allowed in _EXPORT_INFO_KEYS.items():
        if key in info and info[key] not in allowed:
            raise UserError(f"{path}: key {key!r} must be one of {list(allowed)}, got {info[key]!r}")
    return info


def export_hf(run: OpenedRun, out: str | Path) -> str:
    """Write ``run``'s model as a Hugging Face folder with its tokenizer and ``icot_jax.json``, to a local
    folder or a ``gs://`` URL (written into a temporary folder, then copied up, replacing the weight files
    of an earlier export there); returns ``out``. Every process calls it; process 0 writes."""
    import jax

    from icot_jax.models import hf

    out = str(out)
    with tempfile.TemporaryDirectory(prefix="icot-export-") as mirrors:
        target = RunDir(out, mirror_root=mirrors) if is_remote(out) else RunDir(out)
        hf.export_pretrained(run.model, run.hf_config, target.local, tokenizer=run.tokenizer)
        if jax.process_index() == 0:
            write_export_info(target.local, run)
            remote = epath.Path(out)
            for stale in [*remote.glob("model*.safetensors"), *remote.glob("*.index.json")] if target.mirrored else []:
                stale.unlink()
            target.push()
    return out
