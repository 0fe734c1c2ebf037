"""Faults around the data (issue 10): credentials in the tracking URI never leave the process environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from mlflow import MlflowClient

from saeflow.config import validate_config

SECRET = "s3cret-Pa55"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (SQLite backend, local artifacts); its URL without credentials."""
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(tmp_path / "mlflow-server.log", "w")  # handed to the server for its life
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--default-artifact-root",
            f"{tmp_path}/art",
            "--artifacts-destination",
            f"{tmp_path}/art",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_credentials_in_the_tracking_uri_move_to_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    cfg = validate_config({"tracking": {"uri": f"https://alice:{SECRET}@mlflow.example.org:8443/base"}})
    assert cfg.tracking.uri == cfg.tracking_uri == "https://mlflow.example.org:8443/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    assert SECRET not in json.dumps(cfg.model_dump(mode="json")) and SECRET not in yaml.safe_dump(cfg.model_dump())


def test_a_pipeline_run_never_shows_the_tracking_password(prefect_server, make_config, mlflow_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    cfg = make_config(
        extract={"sites": ["resid_post.1"]}, saes=[{"architecture": "topk", "k": 8, "expansion_factor": 4}]
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    authed = mlflow_server.replace("http://", f"http://alice:{SECRET}@")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("MLFLOW_TRACKING_URI", None)
    exe = os.path.join(os.path.dirname(sys.executable), "saeflow")
    res = subprocess.run(
        [exe, "run", str(path), "--set", f"tracking.uri={authed}"], capture_output=True, text=True, env=env, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert SECRET not in res.stdout + res.stderr
    assert f"tracking URI {mlflow_server}" in res.stdout
    client = MlflowClient(mlflow_server, mlflow_server)
    (exp,) = [e for e in client.search_experiments() if e.name == cfg.tracking.experiment]
    runs = client.search_runs([exp.experiment_id])
    assert runs
    for run in runs:
        assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    resolved = client.download_artifacts(parent.info.run_id, "config/resolved.yaml", str(tmp_path))
    with open(resolved) as f:
        text = f.read()
    assert SECRET not in text and mlflow_server in text
    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs()
        logs = prefect.read_logs()
    assert flow_runs and SECRET not in json.dumps([fr.parameters for fr in flow_runs], default=str)
    assert SECRET not in " ".join(log.message for log in logs)


def test_a_second_run_on_a_busy_root_fails_at_once_naming_the_first(prefect_server, make_config, tmp_path):
    """Two runs on one root would write the same stores and race to create the MLflow schema: the second one
    fails before doing anything, and the lock dies with its holder (SIGKILL included)."""
    import signal

    from prefect.settings import PREFECT_API_URL

    cfg = make_config()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom saeflow.storage.locks import root_lock\n"
            f"with root_lock({cfg.root!r}):\n    print('held', flush=True)\n    time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        exe = os.path.join(os.path.dirname(sys.executable), "saeflow")
        res = subprocess.run([exe, "run", str(path)], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 2
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1
        assert lines[0].startswith(f"error: {cfg.root} is in use by saeflow pid {holder.pid} on {socket.gethostname()}")
        assert lines[0].endswith("wait for it to finish, or run this one with another root (--set root=DIR)")
        # no store, no MLflow database was started: only the holder's lock and reserve, and this command's log
        assert sorted(os.listdir(cfg.root)) == [".saeflow.lock", ".saeflow.reserve", "logs"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    from saeflow.storage.locks import root_lock

    with root_lock(cfg.root):  # the killed holder's lock went with it
        pass


def test_runs_a_killed_process_left_running_are_marked_killed_by_the_next_run(make_config, tmp_path):
    from saeflow.storage.tracking import Tracker
    from saeflow.tasks.common import tracker
    from saeflow.tasks.tracking import start_pipeline_run

    cfg = make_config()
    tr = tracker(cfg)
    parent = tr.start_run("killed")
    nested = [tr.start_run(f"killed/{i}", parent) for i in range(2)]
    other_root = Tracker(cfg.tracking_uri, cfg.tracking.experiment, owner=str(tmp_path / "elsewhere"))
    foreign = other_root.start_run("someone else's")
    new = start_pipeline_run.fn(cfg)
    status = {r: tr.client.get_run(r).info.status for r in [parent, *nested, foreign, new]}
    assert status == {parent: "KILLED", nested[0]: "KILLED", nested[1]: "KILLED", foreign: "RUNNING", new: "RUNNING"}


SAEFLOW = os.path.join(os.path.dirname(sys.executable), "saeflow")


def cli_env() -> dict[str, str]:
    """The test's environment, with the CLI pointed at the session's Prefect server and the config's MLflow store."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def write_config(cfg, tmp_path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def _run_cli(cfg, tmp_path, *overrides, timeout=300, options=()) -> subprocess.CompletedProcess:
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(
        [SAEFLOW, *options, "run", write_config(cfg, tmp_path), *sets],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


def _private_mounts_refused() -> str:
    """Why `unshare -Urm` cannot run here ('' when it can)."""
    try:
        probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return "" if probe.returncode == 0 else probe.stderr.strip() or f"exit code {probe.returncode}"


def in_private_mounts(script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the shell `script` in a mount namespace of its own (`unshare -Urm`: no privileges needed where user
    namespaces are allowed, as on this project's machines), where it may mount a small or read-only tmpfs that
    disappears with it. On a machine that forbids user namespaces the test is skipped, saying so."""
    refused = _private_mounts_refused()
    if refused:
        pytest.skip(f"needs `unshare -Urm` (a private tmpfs), which this machine refuses: {refused}")
    return subprocess.run(
        ["unshare", "-Urm", "sh", "-euc", script], capture_output=True, text=True, env=cli_env(), timeout=timeout
    )


def one_error_line(res) -> str:
    """The one `error:` line of a failed command, which shows no traceback (those go to its log file)."""
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Logging error" not in res.stderr, res.stderr[-3000:]
    return lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_one_line_before_tokenization(prefect_server, make_config, tmp_path):
    cfg = make_config()
    res = _run_cli(cfg, tmp_path, "model.device=cuda")
    assert res.returncode == 2
    assert one_error_line(res) == (
        "error: model.device is 'cuda' but this machine has no CUDA device (or a CPU-only torch): set "
        "model.device=auto or cpu"
    )
    assert not os.path.exists(os.path.join(cfg.root, "store"))  # nothing tokenized


def test_an_unreachable_tracking_server_is_one_line_within_seconds(prefect_server, make_config, tmp_path):
    cfg = make_config()
    t0 = time.monotonic()
    res = _run_cli(cfg, tmp_path, "tracking.uri=http://127.0.0.1:9")
    assert res.returncode == 2 and time.monotonic() - t0 < 120
    line = one_error_line(res)
    assert line.startswith("error: the MLflow tracking server http://127.0.0.1:9 does not answer (")
    assert line.endswith("start it, or set tracking.uri / MLFLOW_TRACKING_URI to one that runs")
    assert not os.path.exists(os.path.join(cfg.root, "store"))


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "every file is empty"),
        (
            '{"text": "fine words"}\n{"text": null}\n',
            "row 2: 'text' is NoneType 'None', not text: fix or drop that row",
        ),
        ('{"text": 5}\n', "row 1: 'text' is int '5', not text: fix or drop that row"),
        ('{"body": "x"}\n', "has no field 'text'; set dataset.text_field to one of ['body']"),
    ],
)
def test_a_dataset_without_text_is_one_line(prefect_server, make_config, tmp_path, content, expected):
    data = tmp_path / "docs.jsonl"
    data.write_text(content)
    cfg = make_config(dataset={"source": str(data)})
    res = _run_cli(cfg, tmp_path)
    assert res.returncode == 2
    line = one_error_line(res)
    assert line.startswith("error: dataset") and expected in line, line
    (log,) = os.listdir(os.path.join(cfg.root, "logs"))  # the traceback is kept in the command's log file
    assert log.startswith("run-") and log.endswith(".log")
    with open(os.path.join(cfg.root, "logs", log)) as f:
        text = f.read()
    assert "Traceback (most recent call last)" in text and "saeflow.storage.text.DatasetError: dataset" in text


def test_debug_shows_the_traceback_behind_the_error_line(prefect_server, make_config, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("")
    cfg = make_config(dataset={"source": str(data)})
    res = _run_cli(cfg, tmp_path, options=["--debug"])
    assert res.returncode == 2
    assert "Traceback (most recent call last)" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith(f"error: dataset.source {str(data)!r}: every file is empty")


def test_a_read_only_root_is_one_line_before_anything_starts(prefect_server, tiny_gpt2_dir, tmp_path):
    from tests.conftest import tiny_config

    mount = tmp_path / "ro"
    mount.mkdir()
    cfg = tiny_config(str(mount / "work"), tiny_gpt2_dir)
    res = in_private_mounts(f"mount -t tmpfs -o ro tmpfs {mount}\nexec {SAEFLOW} run {write_config(cfg, tmp_path)}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert one_error_line(res) == (
        f"error: cannot write to the root {mount}/work (Read-only file system): set root to a writable directory "
        "(--set root=DIR)"
    )


def test_an_unreachable_prefect_api_is_one_line_within_seconds(make_config, tmp_path):
    cfg = make_config()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    exe = os.path.join(os.path.dirname(sys.executable), "saeflow")
    t0 = time.monotonic()
    res = subprocess.run([exe, "run", str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and time.monotonic() - t0 < 60
    assert one_error_line(res) == (
        "error: the Prefect API at http://127.0.0.1:9/api does not answer (ConnectError): start it with "
        "`prefect server start`"
    )
    assert not os.path.exists(cfg.root)


def _flip_bytes(path: str) -> bytes:
    """Overwrite the middle of a chunk file, as a bad disk block would; returns the original bytes."""
    with open(path, "rb") as f:
        original = f.read()
    damaged = bytearray(original)
    for i in range(len(damaged) // 2, min(len(damaged), len(damaged) // 2 + 16)):
        damaged[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(damaged))
    return original


def test_a_corrupt_activation_chunk_is_named_then_recomputed_byte_for_byte(prefect_server, make_config, tmp_path):
    cfg = make_config(
        extract={"sites": ["resid_post.1"], "batch_size": 16},
        saes=[{"architecture": "topk", "k": 8, "expansion_factor": 4}],
    )
    assert _run_cli(cfg, tmp_path).returncode == 0
    (store,) = os.listdir(os.path.join(cfg.store_url, "activations"))
    url = os.path.join(cfg.store_url, "activations", store)
    chunks = os.path.join(url, "resid_post.1", "acts", "c")
    assert len(os.listdir(chunks)) >= 2
    original = _flip_bytes(os.path.join(chunks, "1", "0"))
    before = {c: open(os.path.join(chunks, c, "0"), "rb").read() for c in os.listdir(chunks) if c != "1"}

    res = _run_cli(cfg, tmp_path)
    assert res.returncode == 2
    assert one_error_line(res) == (
        f"error: chunk 1 of the activation store {url}/resid_post.1/acts is corrupt (checksum mismatch): it is "
        "marked for recomputation, rerun the same command (the rest of the store is reused)"
    )
    res = _run_cli(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    chunk_rows = int(json.load(open(os.path.join(url, "zarr.json")))["attributes"]["chunk_rows"])
    assert f"extract: resuming {url} at row {chunk_rows:,} of" in res.stderr  # chunk 0 was kept
    with open(os.path.join(chunks, "1", "0"), "rb") as f:
        assert f.read() == original  # recomputed exactly
    for c, data in before.items():
        with open(os.path.join(chunks, c, "0"), "rb") as f:
            assert f.read() == data


def test_a_corrupt_or_missing_token_chunk_marks_the_store_for_rewriting(tmp_path):
    import numpy as np

    from saeflow.storage.integrity import CorruptChunkError, locate_corruption
    from saeflow.storage.tokens import WINDOWS_PER_CHUNK, open_token_store, read_windows, write_token_store

    url = str(tmp_path / "tokens")
    windows = (np.full(8, i, dtype=np.int32) for i in range(3 * WINDOWS_PER_CHUNK))
    ref = write_token_store(url, windows, 2 * WINDOWS_PER_CHUNK, WINDOWS_PER_CHUNK, 8, {})
    _flip_bytes(os.path.join(url, "tokens", "c", "2", "0"))
    with pytest.raises(ValueError, match="checksum") as raised:
        read_windows(ref, "eval")
    named = locate_corruption(raised.value, {"token store": ref})
    assert isinstance(named, CorruptChunkError)
    assert str(named) == (
        f"chunk 2 of the token store {url}/tokens is corrupt (checksum mismatch): it is marked for recomputation, "
        "rerun the same command (the rest of the store is reused)"
    )
    assert open_token_store(url) is None  # the next run writes it again
    assert locate_corruption(ValueError("some other problem"), {"token store": ref}) is None

    ref = write_token_store(url, (np.zeros(8, dtype=np.int32) for _ in range(WINDOWS_PER_CHUNK * 2)), 256, 256, 8, {})
    assert open_token_store(url) == ref
    os.remove(os.path.join(url, "tokens", "c", "1", "0"))  # a lost chunk file would read as zeros
    assert open_token_store(url) is None


def test_a_registry_command_leaves_the_mlflow_retry_setting_as_it_found_it(make_config, monkeypatch):
    """A registry listing shortens MLflow's retries for itself only: runs started later in the same process (a
    notebook, the CLI's children) keep MLflow's patient default for tracking blips."""
    from saeflow.api import list_models
    from saeflow.tasks.common import tracker

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    cfg = make_config()
    tracker(cfg)  # creates the store
    assert list_models("*", cfg.tracking_uri) == []
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_full_or_read_only_disk_is_recognised_however_a_library_reports_it():
    import errno
    import sqlite3

    from safetensors import SafetensorError

    from saeflow.storage.faults import environment_failure

    full = [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ]
    try:
        raise RuntimeError("MlflowException: (sqlite3.OperationalError)") from sqlite3.OperationalError(
            "database or disk is full"
        )
    except RuntimeError as wrapped:
        full.append(wrapped)
    for e in full:
        assert (environment_failure(e, "/data") or "").startswith("no space left on the disk"), e
    assert environment_failure(OSError(errno.EROFS, "Read-only file system", "/data/x")) == (
        "read-only file system writing /data/x: set root (and store) to a writable directory (--set root=DIR)"
    )
    assert environment_failure(OSError(errno.ENOENT, "No such file or directory")) is None
    assert environment_failure(ValueError("a bad value")) is None


def test_an_interrupt_waits_for_the_tracking_call_it_lands_in():
    """Ctrl-C inside an MLflow write is raised when the write returns, not between its INSERT and its commit."""
    from saeflow.storage.interrupts import WholeCalls, interrupt

    done = []

    class Store:
        def write(self):
            interrupt(KeyboardInterrupt())  # the signal arrives mid-call
            done.append("committed")
            return "ok"

    with pytest.raises(KeyboardInterrupt):
        WholeCalls(Store()).write()
    assert done == ["committed"]
    with pytest.raises(KeyboardInterrupt):  # outside any call it is raised at once
        interrupt(KeyboardInterrupt())
