"""Bad input fails with one clear line and leaves nothing half-registered."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from saeflow.cli import app
from saeflow.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return CliRunner().invoke(app, list(args))


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "path",
    ["configs/demo.yaml", "configs/gpt2-openwebtext.yaml", "benchmarks/sotu-smollm2.yaml", "configs/sweep-demo.yaml"],
)
def test_shipped_configs_validate_offline(path):
    cfg = load_config(f"{ROOT}/{path}")
    assert cfg.extract.sites and cfg.saes


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"tokens": {"context_sise": 64}}))
    with pytest.raises(ConfigError, match=r"tokens\.context_sise: unknown key"):
        load_config(str(p))
    res = run_cli("validate", str(p))
    assert res.exit_code == 2 and "tokens.context_sise" in error_line(res)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("tokens.context_size=1", "tokens.context_size"),
        ("saes.0.architecture=resnet", "saes.0"),
        ("saes.0.k=0", "saes.0.topk.k"),
        ("extract.sites=[resid_post]", "bad site 'resid_post'"),
        ("stats.normalize=l2", "stats.normalize"),
        ("tokens", "must look like key.path=value"),
        ("tracking.registered_model_prefix=team/", "'team/' contains /, which MLflow model names cannot"),
    ],
)
def test_invalid_values_fail_with_one_line(override, fragment):
    res = run_cli("validate", f"{ROOT}/configs/demo.yaml", "--set", override)
    assert res.exit_code == 2
    assert fragment in error_line(res)


def test_missing_config_file():
    res = run_cli("validate", "/no/such/config.yaml")
    assert res.exit_code == 2 and "not found" in error_line(res)


def run_cli_process(*args) -> subprocess.CompletedProcess:
    """The installed `saeflow` command in its own process, talking to the test session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    exe = os.path.join(os.path.dirname(sys.executable), "saeflow")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=600)


def _write(tmp_path, cfg) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(p)


def test_missing_model_path_fails_clearly_and_registers_nothing(prefect_server, make_config, tmp_path):
    cfg = make_config(model={"name": str(tmp_path / "no-such-model")})
    res = run_cli_process("run", _write(tmp_path, cfg))
    assert res.returncode == 2
    assert "does not exist" in error_line(res) and "no-such-model" in error_line(res)
    assert MlflowClient(cfg.tracking_uri, cfg.tracking_uri).search_registered_models() == []


def test_unknown_site_fails_clearly_and_registers_nothing(prefect_server, make_config, tmp_path):
    cfg = make_config(extract={"sites": ["resid_post.1", "resid_post.7"]})
    res = run_cli_process("run", _write(tmp_path, cfg))
    assert res.returncode == 2
    line = error_line(res)
    assert "resid_post.7 does not exist" in line and "3 blocks" in line
    # The preflight check finds it before tokenization and before any MLflow run is opened.
    assert not os.path.exists(os.path.join(cfg.root, "store")) and not os.path.exists(
        os.path.join(cfg.root, "mlflow.db")
    )


@pytest.mark.parametrize(
    "override, words",
    [
        ("retrain.cron='0 25 * * *'", "config error at retrain.cron: Value error, bad cron expression '0 25 * * *'"),
        (
            "retrain.timezone=Mars/Olympus",
            "config error at retrain.timezone: Value error, unknown time zone "
            "'Mars/Olympus': give an IANA name such as UTC or Europe/Berlin",
        ),
        (
            "promotion.metric=accuracy",
            "config error at promotion.metric: Input should be 'auto', 'ce_loss_recovered' or 'fvu'",
        ),
    ],
)
def test_bad_schedule_and_promotion_settings_fail_with_one_line(override, words):
    r = run_cli("validate", f"{ROOT}/configs/demo.yaml", "--set", override)
    assert r.exit_code == 2
    assert error_line(r).startswith(f"error: {words}")


def test_registry_commands_without_a_store_fail_with_one_line_and_create_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/nowhere/mlflow.db"
    for args in (["models"], ["promote", "some.model", "1"]):
        r = run_cli(*args, "--tracking-uri", uri)
        assert r.exit_code == 2
        assert error_line(r) == (
            f"error: no MLflow store at {uri}: run `saeflow run` first, or pass --tracking-uri "
            "/ set MLFLOW_TRACKING_URI"
        )
    assert not (tmp_path / "nowhere").exists()
