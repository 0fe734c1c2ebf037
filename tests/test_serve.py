"""`saeflow serve` as a user runs it: a real Prefect server, the serve process as a subprocess on a tiny local
model, a run triggered the way the UI does (run_deployment with edited parameters), and the results found in
Prefect (artifacts, schedule) and in the MLflow registry (versions, aliases, links both ways)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_config

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def served(prefect_server, tiny_gpt2_dir, tmp_path):
    from prefect.settings import PREFECT_API_URL

    cfg = tiny_config(
        "./work",
        tiny_gpt2_dir,
        name="ui-demo",
        extract={"sites": ["resid_post.1"], "batch_size": 16},
        saes=[{"architecture": "topk", "k": 8, "expansion_factor": 4}],
        eval={"batch_size": 8, "latent_report": False, "afa": False},
        retrain={"cron": "30 3 * * *", "timezone": "Europe/Berlin"},
    )
    path = tmp_path / "ui-demo.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [os.path.join(BIN, "saeflow"), "serve", str(path)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield tmp_path, env, proc, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def prefect_cli_listings(env: dict[str, str]) -> dict[str, str]:
    """stdout of `prefect deployment|flow|flow-run|work-pool ls`, each asserted to exit 0."""
    out = {}
    for what in ("deployment", "flow", "flow-run", "work-pool"):
        r = subprocess.run(
            [os.path.join(BIN, "prefect"), what, "ls"], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, (what, r.stderr)
        out[what] = r.stdout
    return out


async def wait_for_deployments(names: set[str], proc, log, timeout=180):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for _ in range(timeout):
            found = {f"{(await client.read_flow(d.flow_id)).name}/{d.name}": d for d in await client.read_deployments()}
            if names <= set(found):
                return found
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"saeflow serve exited {proc.returncode}:\n{log.read()}")
            await asyncio.sleep(1)
    log.seek(0)
    raise AssertionError(f"deployments {names - set(found)} never appeared:\n{log.read()}")


def test_serve_registers_deployments_and_a_ui_triggered_run_lands_in_the_registry(served):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    tmp_path, env, proc, log = served
    names = {"sae_pipeline/ui-demo", "sae_sweep/ui-demo", "evaluate_sae/ui-demo", "sae_retrain/nightly"}
    found = asyncio.run(wait_for_deployments(names, proc, log))

    nightly = found["sae_retrain/nightly"]
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
        "30 3 * * *",
        "Europe/Berlin",
        True,
    )
    log.seek(0)
    assert "sae_retrain/nightly: cron '30 3 * * *' (Europe/Berlin); next run " in log.read()

    pipeline = found["sae_pipeline/ui-demo"]
    defaults = pipeline.parameters["config"]
    root = str(tmp_path / "work")
    assert defaults["root"] == root  # resolved at serve time, not relative to whatever runs the flow
    assert defaults["tracking"]["uri"] == f"sqlite:///{root}/mlflow.db"
    schema = pipeline.parameter_openapi_schema
    assert schema["properties"]["config"]["$ref"].endswith("PipelineConfig")
    tokens = schema["definitions"]["TokensConfig"]["properties"]
    assert tokens["eval_tokens"]["description"].startswith("Held-out token budget")  # the form's help text
    assert found["evaluate_sae/ui-demo"].parameters["sae"].endswith(".resid_post.1.topk@champion")

    edited = {**defaults, "name": "edited-in-ui", "train": {**defaults["train"], "seed": 7}}
    flow_run = run_deployment("sae_pipeline/ui-demo", parameters={"config": edited}, timeout=600)
    log.seek(0)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read()}"

    client = MlflowClient(defaults["tracking"]["uri"], defaults["tracking"]["uri"])
    exp = client.get_experiment_by_name("saeflow")
    (parent,) = client.search_runs(
        [exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}' and tags.`saeflow.flow` = 'sae_pipeline'"
    )
    assert parent.info.run_name == "edited-in-ui" and parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_url"].endswith(f"/flow-run/{flow_run.id}")
    (model,) = [m for m in client.search_registered_models() if m.name.endswith(".resid_post.1.topk")]
    v1 = client.get_model_version(model.name, "1")
    assert v1.tags["seed"] == "7" and client.get_run(v1.run_id).data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert {a: str(v) for a, v in model.aliases.items()} == {"champion": "1", "challenger": "1", "current": "1"}

    async def artifacts():
        async with get_client() as c:
            return await c.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
            )

    arts = {a.key: a for a in asyncio.run(artifacts())}
    assert f"{model.name} v1" in arts["sae-results"].data and "**champion** (first)" in arts["sae-results"].data
    assert f"/runs/{parent.info.run_id})" in arts["mlflow-run"].data

    listed = prefect_cli_listings({**env, "COLUMNS": "250"})  # wide: rich would wrap the names in a narrow terminal
    for name in names:
        assert name in listed["deployment"], (name, listed["deployment"])
    assert "sae_pipeline" in listed["flow"]


def test_serve_without_a_prefect_api_fails_with_one_line(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    start = time.time()
    r = subprocess.run(
        [os.path.join(BIN, "saeflow"), "serve"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: the Prefect API at http://127.0.0.1:9/api does not answer")
    assert time.time() - start < 60


def test_deploy_registers_the_deployments_with_a_work_pool(prefect_server, tiny_gpt2_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    cfg = tiny_config(str(tmp_path / "work"), tiny_gpt2_dir, name="pool-demo")
    path = tmp_path / "pool-demo.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    saeflow = os.path.join(BIN, "saeflow")
    r = subprocess.run(
        [saeflow, "deploy", str(path), "--pool", "no-such-pool"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line == (
        "error: work pool 'no-such-pool' does not exist: create it with `prefect work-pool create "
        "no-such-pool --type process` (or list them with `prefect work-pool ls`)"
    )

    async def make_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="gpu-boxes", type="process"), overwrite=True)

    asyncio.run(make_pool())
    r = subprocess.run(
        [saeflow, "deploy", str(path), "--pool", "gpu-boxes"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "4 deployments in work pool 'gpu-boxes'; run them with: prefect worker start --pool gpu-boxes" in r.stdout

    async def pooled():
        async with get_client() as client:
            return {
                f"{(await client.read_flow(d.flow_id)).name}/{d.name}": d
                for d in await client.read_deployments()
                if d.work_pool_name == "gpu-boxes"
            }

    found = asyncio.run(pooled())
    assert set(found) == {
        "sae_pipeline/pool-demo",
        "sae_sweep/pool-demo",
        "evaluate_sae/pool-demo",
        "sae_retrain/nightly",
    }
    assert found["sae_pipeline/pool-demo"].entrypoint == "flows/pipeline.py:sae_pipeline"
    assert found["sae_pipeline/pool-demo"].parameters["config"]["root"] == str(tmp_path / "work")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nightly_schedule_creates_runs_on_a_real_prefect_server_start(tiny_gpt2_dir, tmp_path):
    """`prefect server start` (scheduler service included), `saeflow serve`: the scheduler books the nightly runs at
    the configured cron in the configured time zone, and the Prefect CLI lists what was registered."""
    import datetime

    import httpx

    from saeflow.flows.deployments import next_nightly_run

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "COLUMNS": "250",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cfg = tiny_config(
        str(tmp_path / "work"),
        tiny_gpt2_dir,
        name="sched",
        retrain={"cron": "15 4 * * 1-5", "timezone": "America/New_York"},
    )
    path = tmp_path / "sched.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    procs = []
    try:
        server_log = open(tmp_path / "server.log", "w")
        procs.append(
            subprocess.Popen(
                [os.path.join(BIN, "prefect"), "server", "start", "--port", str(port)],
                env=env,
                stdout=server_log,
                stderr=subprocess.STDOUT,
            )
        )
        for _ in range(180):
            try:
                if httpx.get(api + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        serve_log = open(tmp_path / "serve.log", "w")
        procs.append(
            subprocess.Popen(
                [os.path.join(BIN, "saeflow"), "serve", str(path)],
                env=env,
                cwd=tmp_path,
                stdout=serve_log,
                stderr=subprocess.STDOUT,
            )
        )
        runs = []
        for _ in range(180):
            body = {
                "deployments": {"name": {"any_": ["nightly"]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 5,
            }
            r = httpx.post(api + "/flow_runs/filter", json=body, timeout=10)
            runs = r.json() if r.status_code == 200 else []
            if runs:
                break
            time.sleep(1)
        assert runs, open(tmp_path / "server.log").read()[-3000:] + open(tmp_path / "serve.log").read()[-3000:]
        first = datetime.datetime.fromisoformat(runs[0]["expected_start_time"].replace("Z", "+00:00"))
        want = next_nightly_run(cfg)
        assert first == want and (want.hour, want.minute, want.weekday() < 5) == (4, 15, True)
        assert str(want.tzinfo) == "America/New_York"
        listed = prefect_cli_listings(env)
        assert "sae_retrain/nightly" in listed["deployment"] and "sae_pipeline/sched" in listed["deployment"]
        assert "sae_retrain" in listed["flow-run"]
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
