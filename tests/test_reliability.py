"""Real signals and a really full disk against the real CLI (issue 10, cases 4, 6, 7, 8, 11).

Each test runs `saeflow run` as a process of its own on the tiny model and acts on it from outside, as a user's
terminal, the kernel or a dying disk would: SIGKILL, Ctrl-C (SIGINT to the process group), SIGTERM, a disk filled
up mid-training, the MLflow server killed and restarted mid-training. Marked `reliability` (tens of seconds each);
`.ci/run` runs them with the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
from mlflow import MlflowClient

from tests.test_faults import SAEFLOW, cli_env, in_private_mounts, one_error_line, write_config

pytestmark = pytest.mark.reliability

LONG_TRAINING = ("tokens.train_tokens=60000", "train.checkpoint_every_tokens=2048")
"""Enough training on the tiny model (a few seconds) to land a signal in it after its first checkpoint."""


def one_site_config(make_config):
    return make_config(extract={"sites": ["resid_post.1"], "batch_size": 16})


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> str:
    """PREFECT_HOME of the CLI's own temporary Prefect server (no PREFECT_API_URL is set in these tests)."""
    return str(tmp_path_factory.mktemp("prefect-home"))


def start_cli(cfg_path: str, logs, prefect_home: str | None, *sets: str) -> subprocess.Popen:
    """`saeflow run` in a session of its own (as a terminal starts a job), stdout/stderr to files."""
    env = cli_env()
    if prefect_home is not None:  # the CLI starts and owns a temporary Prefect server
        env.pop("PREFECT_API_URL")
        env["PREFECT_HOME"] = prefect_home
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(
        [SAEFLOW, "run", cfg_path, *args],
        stdout=open(logs / "stdout", "w"),  # the child owns them
        stderr=open(logs / "stderr", "w"),
        env=env,
        start_new_session=True,
    )


def wait_for_line(proc: subprocess.Popen, path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        time.sleep(0.1)


def survivors(procs: list[psutil.Process], grace: float = 10.0) -> list[str]:
    """The processes of `procs` still alive after `grace` seconds, as 'pid cmdline'."""
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid} {' '.join(p.cmdline())}" for p in alive]
        time.sleep(0.2)


def runs_by_start(cfg) -> list:
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)


def test_sigkill_leaves_no_process_behind_and_the_rerun_marks_its_runs_killed_and_resumes(
    make_config, prefect_home, tmp_path
):
    cfg = one_site_config(make_config)
    path = write_config(cfg, tmp_path)
    proc = start_cli(path, tmp_path, prefect_home, *LONG_TRAINING)
    wait_for_line(proc, tmp_path / "stderr", "checkpoint at")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("saeflow.local_server" in " ".join(c.cmdline()) for c in children)  # the temporary Prefect server
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert survivors(children) == []  # re-parented to PID 1 before; now they follow their parent

    killed = {r.info.run_id: r.info.status for r in runs_by_start(cfg)}
    assert set(killed.values()) == {"RUNNING"} and len(killed) == 3  # parent + 2 nested, left open by the kill
    rerun = start_cli(path, tmp_path, prefect_home, *LONG_TRAINING)
    assert rerun.wait(600) == 0, (tmp_path / "stderr").read_text()[-3000:]
    err = (tmp_path / "stderr").read_text()
    assert "marked 3 MLflow runs a killed run left RUNNING as KILLED" in err
    assert "resuming from" in err
    runs = runs_by_start(cfg)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(nested) == 2  # the killed run's nested runs, continued
    assert all(r.info.status == "FINISHED" and int(r.data.tags["resumed_at_tokens"]) >= 2048 for r in nested)
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parents[1].info.run_id}
    client = MlflowClient(cfg.tracking_uri)
    for model in client.search_registered_models():
        assert len(client.search_model_versions(f"name = '{model.name}'")) == 1


@pytest.mark.parametrize(
    "how, to_group, code, said",
    [(signal.SIGINT, True, 130, "Ctrl-C"), (signal.SIGTERM, False, 143, "SIGTERM")],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupt_exits_within_seconds_with_its_runs_failed_and_a_checkpoint_kept(
    make_config, prefect_home, tmp_path, how, to_group, code, said
):
    """Ctrl-C in a terminal signals the whole foreground process group; a service manager sends SIGTERM."""
    cfg = one_site_config(make_config)
    proc = start_cli(write_config(cfg, tmp_path), tmp_path, prefect_home, *LONG_TRAINING)
    wait_for_line(proc, tmp_path / "stderr", "checkpoint at")
    children = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    if to_group:
        os.killpg(proc.pid, how)
    else:
        proc.send_signal(how)
    assert proc.wait(60) == code
    assert time.monotonic() - t0 < 20
    res = subprocess.CompletedProcess(proc.args, code, "", (tmp_path / "stderr").read_text())
    assert one_error_line(res) == (
        f"error: interrupted ({said}): its MLflow runs are marked FAILED; rerun the same command to resume "
        "(finished stages are reused, training continues from its last checkpoint)"
    )
    assert survivors(children) == []
    assert [r.info.status for r in runs_by_start(cfg)] == ["FAILED"] * 3
    (group,) = os.listdir(os.path.join(cfg.root, "checkpoints"))
    assert any(n.startswith("state-") for n in os.listdir(os.path.join(cfg.root, "checkpoints", group)))


def test_a_disk_filling_up_mid_training_is_one_line_and_its_runs_are_failed(prefect_server, tiny_gpt2_dir, tmp_path):
    """The root on a 64 MiB tmpfs that a `dd` fills once training has checkpointed: the MLflow store beside the
    data is full too, which is what used to leave nested runs RUNNING behind a sqlite traceback."""
    from tests.conftest import tiny_config

    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    cfg = tiny_config(str(disk), tiny_gpt2_dir, extract={"sites": ["resid_post.1"], "batch_size": 16})
    sets = " ".join(f"--set {s}" for s in LONG_TRAINING)
    res = in_private_mounts(
        f"""
mount -t tmpfs -o size=64m tmpfs {disk}
{SAEFLOW} run {write_config(cfg, tmp_path)} {sets} >{out}/stdout 2>{out}/stderr &
pid=$!
until grep -q "checkpoint at" {out}/stderr; do kill -0 $pid; sleep 0.1; done
dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null || true
rc=0; wait $pid || rc=$?
cp {disk}/mlflow.db {out}/
ls {disk}/checkpoints/*/ >{out}/checkpoints
exit $rc
"""
    )
    err = (out / "stderr").read_text()
    assert res.returncode == 2, res.stderr + err[-3000:]
    assert one_error_line(subprocess.CompletedProcess([], 2, "", err)) == (
        f"error: no space left on the disk: free some where the root ({disk}) and its store live (or set "
        "root/store to a bigger disk) and rerun the same command; finished stages are reused and training resumes "
        "from its last checkpoint"
    )
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == cfg.tracking.experiment]
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["FAILED"] * 3
    # resumable once there is space: a complete training state is kept (a save cut short never replaces one)
    assert any(name.startswith("state-") for name in (out / "checkpoints").read_text().split())


class MlflowServer:
    """A real `mlflow server` on a fixed loopback port (SQLite backend, proxied artifacts) that can be killed and
    started again on the same port and store."""

    def __init__(self, tmp_path):
        from tests.test_faults import _free_port

        self.tmp_path, self.port = tmp_path, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import sys
        import urllib.request

        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        store = ["--backend-store-uri", f"sqlite:///{self.tmp_path}/server.db"]
        art = ["--artifacts-destination", str(self.tmp_path / "art")]
        self.proc = subprocess.Popen(
            [exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *store, *art],
            stdout=open(self.tmp_path / "mlflow-server.log", "a"),  # the server owns it
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            start_new_session=True,  # its workers go with it when killed as a group
        )
        for _ in range(180):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, (self.tmp_path / "mlflow-server.log").read_text()[-3000:]
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def test_a_tracking_server_down_for_seconds_mid_training_does_not_fail_the_run(prefect_server, make_config, tmp_path):
    """MLflow's client retries a refused request with backoff (7 tries, about 4 minutes, MLflow's defaults) and
    the tracking tasks retry on top: a server restarted within that window loses nothing."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        cfg = one_site_config(make_config)
        proc = start_cli(write_config(cfg, tmp_path), tmp_path, None, *LONG_TRAINING, f"tracking.uri={server.url}")
        wait_for_line(proc, tmp_path / "stderr", "checkpoint at")
        server.kill()
        time.sleep(5)
        assert proc.poll() is None  # waiting on the tracking server, not failed
        server.start()
        assert proc.wait(600) == 0, (tmp_path / "stderr").read_text()[-3000:]
        client = MlflowClient(server.url, server.url)
        (exp,) = [e for e in client.search_experiments() if e.name == cfg.tracking.experiment]
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"] * 3
        for r in runs:
            if "mlflow.parentRunId" in r.data.tags:  # every training step reached the server, none twice
                steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
                assert steps == sorted(set(steps)) and steps[-1] >= 58000
        assert len(client.search_registered_models()) == 2
    finally:
        if server.proc and server.proc.poll() is None:
            server.kill()
