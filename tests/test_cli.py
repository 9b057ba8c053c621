"""``icot``: a UserError is one line naming what to fix; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from icot_jax import cli
from icot_jax.data import multiplication
from icot_jax.errors import MissingPathError, UserError


def test_every_subcommand_is_registered():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps no public list of subcommands
    assert set(commands) == {"data", "train", "demo", "export-hf", "eval", "generate", "tradeoff", "aot"}


def test_the_parser_loads_no_accelerator_library():
    """`icot --help` and the light commands stay fast: the commands import jax, flax, orbax and
    transformers inside their handlers, never when the parser is built."""
    heavy = ("jax", "flax", "orbax", "transformers", "torch")
    probe = f"import sys, icot_jax.cli; icot_jax.cli.build_parser(); print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_user_error_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^icot data: error: digits must be in \[2, 20\], got 0$"):
        cli.main(["data", "multiplication", "--digits", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=rf"^icot train: error: {tmp_path}/missing.yaml: config file not found$"):
        cli.main(["train", str(tmp_path / "missing.yaml")])


def test_a_missing_file_is_a_user_error_and_still_a_file_not_found_error(tmp_path):
    with pytest.raises(SystemExit, match=rf"^icot data: error: {tmp_path}/none.jsonl: no such file$"):
        cli.main(["data", "gsm8k", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out.txt")])
    assert issubclass(MissingPathError, UserError) and issubclass(MissingPathError, FileNotFoundError)


def test_any_other_exception_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(multiplication, "write_dataset", broken)
    with pytest.raises(ValueError, match="a bug, not a user error"):
        cli.main(["data", "multiplication", "--digits", "2", "--out", str(tmp_path)])
