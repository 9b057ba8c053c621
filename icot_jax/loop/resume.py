"""What may change when a run resumes: ``icot train --resume RUN key=value ...``.

A resumed run must replay the same data through the same model, so only keys that cannot change either
may be overridden: the learning rate, its warm-up and decay, gradient clipping, the number of epochs (the
schedule is a pure function of the step), and how often the run evaluates, checkpoints and logs. This is
what recovering from a divergence needs (resume from the last good checkpoint with a lower LR). Every
accepted change is appended to ``config_history.jsonl`` with the step it took effect at, and
``config.yaml`` holds the config now in force.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from icot_jax.config import Config, ConfigError, load_config, save_config, to_dict

RESUMABLE_KEYS = ("train.lr", "train.lr_decay", "train.warmup_steps", "train.max_grad_norm", "train.epochs", "eval.*",
                  "checkpoint.*", "log_every_steps")
"""Dotted keys (``section.*``: the whole section) that ``--resume`` accepts overrides of."""

HISTORY_FILE = "config_history.jsonl"


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 1e-4, ...}``; ``model.overrides`` and other mappings stay one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "overrides":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every key whose value differs."""
    before, after = _flat(to_dict(old)), _flat(to_dict(new))
    return {key: (before[key], after[key]) for key in after if before[key] != after[key]}


def resume_config(config_path: Path, overrides: list[str]) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The saved config of a run with ``overrides`` applied, and what they change.

    Raises :class:`ConfigError` naming the first key that a resumed run cannot change.
    """
    saved = load_config(config_path)
    if not overrides:
        return saved, {}
    config = load_config(config_path, overrides)
    changes = config_changes(saved, config)
    for key in changes:
        if not _resumable(key):
            raise ConfigError(f"--resume: '{key}' cannot change in a resumed run (it would change the run's data, "
                              f"model or curriculum); these can: {', '.join(RESUMABLE_KEYS)}")
    if "train.warmup_steps" in changes and 0 in changes["train.warmup_steps"]:
        raise ConfigError("--resume: 'train.warmup_steps' cannot go from or to 0 in a resumed run (a warm-up "
                          "keeps a step counter in the optimizer state, which the checkpoint has or lacks)")
    return config, changes


def record_config_changes(run_dir: Path, config: Config, changes: dict[str, tuple[Any, Any]], step: int) -> None:
    """Write ``config.yaml`` (the config now in force) and append the changes to ``config_history.jsonl``."""
    save_config(config, run_dir / "config.yaml")
    entry = {"step": step, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
    with (run_dir / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def read_config_history(run_dir: Path | str) -> list[dict]:
    """The entries of a run's ``config_history.jsonl`` (empty when its config never changed)."""
    path = Path(run_dir) / HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

