"""Two local processes (2 CPU devices each) train together, checkpoint with orbax, restore and resume.

Each process is a separate ``python`` running this file, joined with ``jax.distributed.initialize`` on
localhost (CPU collectives: gloo, JAX's default). The mesh is ``data=2`` across the processes (one slice
each, ``mesh.dcn_data=2``) × ``fsdp=2`` within each; every process feeds only its own rows of each batch.
The losses must equal the single-process run's, and a run restored from the checkpoint must continue
with exactly the loss the uninterrupted run had.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

STEPS, CHECKPOINT_AT = 3, 2


def worker(process_id: str, port: str, out_dir: str) -> None:
    from icot_jax import build, sharding

    assert sharding.initialize_distributed(f"localhost:{port}", 2, int(process_id))
    import jax
    from test_parallel import ROWS, make_model, make_step, synthetic_batch

    from icot_jax.checkpoint import RunCheckpoints
    from icot_jax.config import MeshConfig
    from icot_jax.train.step import make_optimizer

    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
    setup = sharding.setup(MeshConfig(data=1, fsdp=2, tensor=1, dcn_data=2))
    graphdef, state = build.init_state(setup, make_model, make_optimizer(1e-2), seed=0)
    step = make_step(graphdef, setup, state)
    rows = setup.host_rows(ROWS)
    per_host = ROWS // rows["process_count"]
    mine = slice(rows["process_index"] * per_host, (rows["process_index"] + 1) * per_host)

    def train_step(state, i):
        batch, n_remove = synthetic_batch(i)
        state, metrics = step(state, *setup.put({k: v[mine] for k, v in batch.items()}, n_remove[mine]))
        return state, float(metrics["loss"])

    checkpoints = RunCheckpoints(out_dir, keep=2)
    losses = []
    for i in range(STEPS):
        if i == CHECKPOINT_AT:
            checkpoints.save(i, state, {"batch_index": i})
        state, loss = train_step(state, i)
        losses.append(loss)
    checkpoints.wait()
    # Evaluation feeds every host the whole batch; the arrays must equal the ones built from host rows.
    batch, n_remove = synthetic_batch(0)
    from_rows = step.evaluate(state, *setup.put({k: v[mine] for k, v in batch.items()}, n_remove[mine]))
    from_whole = step.evaluate(state, *setup.put(batch, n_remove, whole=True))
    assert float(from_rows["loss"]) == float(from_whole["loss"])
    restored, meta = checkpoints.restore(state, step=CHECKPOINT_AT)
    _, resumed_loss = train_step(restored, meta["batch_index"])
    checkpoints.close()
    if jax.process_index() == 0:
        result = {"rows": rows, "losses": losses, "resumed_loss": resumed_loss}
        (Path(out_dir) / "result.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    from test_parallel import single_device_losses

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, __file__, str(i), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["rows"] == {"process_index": 0, "process_count": 2}
    np.testing.assert_allclose(result["losses"], single_device_losses(STEPS), rtol=1e-5)
    assert result["resumed_loss"] == result["losses"][CHECKPOINT_AT]


if __name__ == "__main__":
    worker(*sys.argv[1:])
