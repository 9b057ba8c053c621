"""Run directories mirrored to a remote location (exercised on disk through the same epath calls)."""


import pytest

from icot_jax.rundir import NewRunFiles, RunDir, is_remote


def test_local_run_dir_is_its_own_mirror(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.mirrored and run.local == tmp_path / "run"
    run.push()  # no-op
    assert run.path("checkpoints") == f"{tmp_path}/run/checkpoints"


def test_remote_urls_are_recognised():
    assert is_remote("gs://bucket/runs/x") and not is_remote("runs/x")
    run = RunDir("gs://bucket/runs/x/")
    assert run.mirrored and run.path("checkpoints") == "gs://bucket/runs/x/checkpoints"
    assert run.local.name.startswith("x-")


def test_push_copies_new_and_changed_files_but_not_checkpoints_or_the_lock(tmp_path):
    remote = tmp_path / "remote"
    run = RunDir(remote, mirror_root=tmp_path / "mirrors")
    (run.local / "tokenizer").mkdir(parents=True)
    (run.local / "tokenizer" / "vocab.json").write_text("{}")
    (run.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (run.local / "checkpoints" / "4").mkdir(parents=True)
    (run.local / "checkpoints" / "4" / "x").write_text("orbax writes these itself")
    (run.local / "lock").write_text('{"pid": 1}')  # one machine's lock: another would take it for stale
    run.push()
    assert (remote / "tokenizer" / "vocab.json").read_text() == "{}"
    assert not (remote / "checkpoints").exists() and not (remote / "lock").exists()
    with (run.local / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2}\n')
    run.push()
    assert (remote / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']


def test_pull_restores_a_fresh_mirror(tmp_path):
    remote = tmp_path / "remote"
    (remote / "model").mkdir(parents=True)
    (remote / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    (remote / "config.yaml").write_text("name: x\n")
    run = RunDir(remote, mirror_root=tmp_path / "mirrors")
    run.pull()
    assert (run.local / "model" / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert (run.local / "config.yaml").read_text() == "name: x\n"
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        RunDir(tmp_path / "missing", mirror_root=tmp_path / "mirrors").pull()


def test_pull_of_named_entries_copies_only_those(tmp_path):
    """What opening a finished run reads (config, tokenizer, model config), not its data or metrics."""
    remote = tmp_path / "remote"
    for name in ("model/config.json", "tokenizer/tokenizer.json", "data/train.txt", "config.yaml", "metrics.jsonl"):
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_text(name)
    run = RunDir(remote, mirror_root=tmp_path / "mirrors")
    run.pull(("config.yaml", "tokenizer", "model"))
    assert sorted(str(p.relative_to(run.local)) for p in run.local.rglob("*") if p.is_file()) == [
        "config.yaml", "model/config.json", "tokenizer/tokenizer.json"]


def test_remove_remote_deletes_a_part_the_mirror_rewrites(tmp_path):
    remote = tmp_path / "remote"
    (remote / "tensorboard").mkdir(parents=True)
    (remote / "tensorboard" / "events.out.tfevents.1").write_text("the killed run's events")
    run = RunDir(remote, mirror_root=tmp_path / "mirrors")
    run.pull()
    run.remove_remote("tensorboard")
    (run.local / "tensorboard" / "events.out.tfevents.1").unlink()
    (run.local / "tensorboard" / "events.out.tfevents.2").write_text("rewritten")
    run.push()
    assert [p.name for p in (remote / "tensorboard").iterdir()] == ["events.out.tfevents.2"]


def test_new_run_files_removes_only_what_came_after_it(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "other").mkdir()  # another run beside it
    new = NewRunFiles(tmp_path / "runs" / "x" / "run")
    new.create()
    (tmp_path / "runs" / "x" / "run" / "tokenizer").mkdir()
    (tmp_path / "runs" / "x" / "run" / "config.yaml").write_text("name: x\n")
    new.discard()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other"]
    kept = tmp_path / "existing"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    new = NewRunFiles(kept)
    new.create()
    (kept / "config.yaml").write_text("name: x\n")
    new.discard()
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_checkpoints_under_a_relative_run_dir(tmp_path, monkeypatch):
    """`run_dir=runs/x` (relative, as users type it): orbax needs absolute paths to finalize saves."""
    import jax.numpy as jnp

    from icot_jax.checkpoint import RunCheckpoints, read_meta

    monkeypatch.chdir(tmp_path)
    checkpoints = RunCheckpoints("runs/rel", keep=1)
    params = {"w": jnp.arange(3.0)}
    checkpoints.save(1, {"params": params}, {"batch_index": 1})
    checkpoints.save_best(1, params, {"val_accuracy": 0.5})
    checkpoints.wait()
    restored, meta = checkpoints.restore_best(params)
    checkpoints.close()
    assert meta == {"val_accuracy": 0.5} and restored["w"].tolist() == [0.0, 1.0, 2.0]
    assert read_meta("runs/rel")["batch_index"] == 1
    assert (tmp_path / "runs" / "rel" / "best" / "1").is_dir()
