"""The whole sae_pipeline on the tiny GPT-2, through a real Prefect server, SQLite MLflow + registry, Zarr, Dask."""

from __future__ import annotations

import json
import os

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

import saeflow
from saeflow.cli import app
from saeflow.flows.pipeline import sae_pipeline
from saeflow.sae.architectures.registry import ARCHITECTURES
from saeflow.sae.evaluation.evaluate import evaluate_site
from saeflow.sae.lm.models import load_model
from saeflow.storage.tokens import iter_window_batches, open_token_store
from saeflow.tasks.common import token_store_url
from tests.conftest import tiny_config


def store_files(root: str) -> dict[str, float]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def pipeline_runs(prefect_server, tiny_gpt2_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline"))
    cfg = tiny_config(root, tiny_gpt2_dir)
    first = sae_pipeline(cfg)
    files_after_first = store_files(cfg.store_url)
    second = sae_pipeline(cfg)
    return cfg, first, second, files_after_first


def test_pipeline_logs_parent_and_nested_runs(pipeline_runs):
    cfg, first, _, _ = pipeline_runs
    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(first["run_id"])
    assert parent.info.status == "FINISHED"
    for site in cfg.extract.sites:
        assert parent.data.metrics[f"stats/{site}/scale"] > 0
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{first['run_id']}'")
    # The headline metrics are on the parent too (what the run list sorts by): per SAE and the best over them.
    summary = {k: v for k, v in parent.data.metrics.items() if k.startswith("summary/")}
    per_sae = {
        f"summary/{c.info.run_name}/{k}": c.data.metrics[f"eval/{k}"]  # run name: site/label
        for c in children
        for k in ("fvu", "l0", "ce_loss_recovered", "kl_div", "dead_fraction")
    }
    assert summary == {
        **per_sae,
        "summary/best_fvu": min(c.data.metrics["eval/fvu"] for c in children),
        "summary/best_ce_loss_recovered": max(c.data.metrics["eval/ce_loss_recovered"] for c in children),
        "summary/best_kl_div": min(c.data.metrics["eval/kl_div"] for c in children),
        "summary/best_dead_fraction": min(c.data.metrics["eval/dead_fraction"] for c in children),
    }
    arts = {a.path for a in client.list_artifacts(first["run_id"])}
    assert {"config", "stats", "manifests", "eval"} <= arts
    tok_manifest = client.download_artifacts(first["run_id"], "manifests/tokens.json")
    assert '"content_hash"' in open(tok_manifest).read()
    assert len(children) == len(cfg.extract.sites) * len(cfg.saes)
    for child in children:
        m = child.data.metrics
        assert child.info.status == "FINISHED"
        for key in (
            "eval/fvu",
            "eval/l0",
            "eval/mse",
            "eval/dead_fraction",
            "eval/ce_loss_recovered",
            "eval/ce_loss_clean",
            "eval/ce_loss_spliced",
            "eval/ce_loss_zero_ablation",
            "eval/kl_div",
            "train/loss",
            "train/fvu",
            "train/l0",
            "train/dead_fraction",
        ):
            assert key in m, key
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) > 3
        assert 0 <= m["eval/fvu"] < 1.5 and m["eval/l0"] > 0
        (output,) = child.outputs.model_outputs  # the SAE is the run's logged MLflow model
        model = client.get_logged_model(output.model_id)
        assert child.data.tags["saeflow.model_uri"] == f"models:/{model.model_id}"
        assert model.experiment_id == parent.info.experiment_id
        assert child.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"]
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.digest == open_token_store(token_store_url(cfg)[0]).content_hash[:36]
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_saes_are_registered_with_tags_and_new_versions_per_run(pipeline_runs):
    cfg, _first, _second, _ = pipeline_runs
    client = MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    models = {m.name for m in client.search_registered_models()}
    want = {
        f"saeflow.{os.path.basename(cfg.model.name)}.{site}.{arch}"
        for site in cfg.extract.sites
        for arch in ("topk", "relu")
    }
    assert want <= models
    for name in want:
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == [1, 2]  # one per pipeline run
        for v in versions:
            assert {"site", "architecture", "data_hash", "config_hash"} <= set(v.tags)
        assert str(client.get_model_version_by_alias(name, "current").version) == "2"


def test_second_run_reuses_tokenize_extract_and_stats(pipeline_runs):
    cfg, first, second, files_after_first = pipeline_runs
    assert store_files(cfg.store_url) == files_after_first  # not one byte of the stores rewritten
    assert open_token_store(token_store_url(cfg)[0]) is not None
    for site in cfg.extract.sites:
        for label, m in first["metrics"][site].items():
            assert second["metrics"][site][label]["fvu"] == pytest.approx(m["fvu"], rel=1e-5)  # same seed, same data


def test_pulled_registered_sae_reproduces_its_logged_metrics(pipeline_runs, tmp_path, tiny_gpt2_dir):
    cfg, first, _, _ = pipeline_runs
    site = "resid_post.1"
    name = f"saeflow.{os.path.basename(cfg.model.name)}.{site}.topk"
    result = CliRunner().invoke(
        app, ["pull", f"{name}@current", str(tmp_path / "pulled"), "--tracking-uri", cfg.tracking_uri]
    )
    assert result.exit_code == 0, result.output
    pulled = saeflow.load_sae(result.stdout.strip().splitlines()[-1])
    assert result.stdout.strip().endswith(os.path.join("pulled", "artifacts", "sae"))  # inside the MLflow model
    for a, b in zip(pulled.state_dict().values(), saeflow.load_sae(str(tmp_path / "pulled")).state_dict().values()):
        assert torch.equal(a, b)  # the pulled directory itself loads too, as the README shows
    by_version = saeflow.load_sae(f"{name}/2", tracking_uri=cfg.tracking_uri)
    for a, b in zip(pulled.state_dict().values(), by_version.state_dict().values()):
        assert torch.equal(a, b)
    client = MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    run_id = client.get_model_version_by_alias(name, "current").run_id
    logged = client.get_run(run_id).data.metrics
    lm = load_model(tiny_gpt2_dir, device="cpu")
    tokens = open_token_store(token_store_url(cfg)[0])
    batches = [ids for _, ids in iter_window_batches(tokens, "eval", cfg.eval.batch_size)]
    stats = client.download_artifacts(first["run_id"], f"stats/{site}.json")

    st = json.load(open(stats))
    m = evaluate_site(
        lm.model,
        batches,
        site,
        {"pulled": pulled},
        True,
        mean_activation=torch.tensor(st["mean"], dtype=torch.float32),
        outlier_norm=st["outlier_norm_threshold"],
        progress=False,
    )["pulled"]
    for key in ("fvu", "l0", "ce_loss_recovered", "kl_div"):
        assert m[key] == pytest.approx(logged[f"eval/{key}"], rel=1e-5, abs=1e-7), key


def test_a_pull_that_fails_creates_nothing(pipeline_runs, tmp_path):
    cfg, _, _, _ = pipeline_runs
    dst = tmp_path / "pulled"
    result = CliRunner().invoke(
        app, ["pull", "saeflow.no-such-model@current", str(dst), "--tracking-uri", cfg.tracking_uri]
    )
    assert result.exit_code == 2
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: cannot pull 'saeflow.no-such-model@current' from {cfg.tracking_uri}: ")
    assert os.listdir(tmp_path) == []  # no destination, no half-downloaded directory beside it


def test_export_writes_a_saelens_sae_that_computes_the_registered_codes(pipeline_runs, tmp_path):
    from tests.test_saelens_interop import saelens_forward

    cfg, _, _, _ = pipeline_runs
    name = f"saeflow.{os.path.basename(cfg.model.name)}.resid_post.1.relu"
    out = tmp_path / "for-saelens"
    result = CliRunner().invoke(
        app, ["export", f"{name}@current", str(out), "--format", "saelens", "--tracking-uri", cfg.tracking_uri]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    meta = json.load(open(out / "cfg.json"))
    assert meta["architecture"] == "standard" and meta["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["metadata"]["model_name"] == cfg.model.name
    sae = saeflow.load_sae(f"{name}@current", tracking_uri=cfg.tracking_uri)
    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(0)) / sae.input_scale
    code, recon = saelens_forward(str(out), x)
    with torch.no_grad():
        torch.testing.assert_close(code, sae.encode_raw(x).double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recon, sae.decode_raw(sae.encode_raw(x)).double(), rtol=1e-5, atol=1e-6)
    again = CliRunner().invoke(app, ["export", f"{name}@current", str(out), "--tracking-uri", cfg.tracking_uri])
    assert again.exit_code == 2 and "is not an empty directory: export into a new one" in again.output
    bad = CliRunner().invoke(app, ["export", str(out), str(tmp_path / "x"), "--format", "onnx"])
    assert bad.exit_code == 2 and "error: unknown export format 'onnx': use --format saelens" in bad.output


def test_show_prints_a_runs_results_table_and_names_what_is_wrong_otherwise(pipeline_runs):
    cfg, first, _, _ = pipeline_runs
    client = MlflowClient(cfg.tracking_uri)
    logged = open(client.download_artifacts(first["run_id"], "eval/results.md"), encoding="utf-8").read()
    result = CliRunner().invoke(app, ["show", first["run_id"], "--tracking-uri", cfg.tracking_uri])
    assert result.exit_code == 0, result.output
    assert result.stdout == logged and "| resid_post.1 | topk-x4-k8 |" in logged
    latest = CliRunner().invoke(app, ["show", "--tracking-uri", cfg.tracking_uri])  # the second run of the fixture
    assert latest.exit_code == 0 and latest.stdout.startswith("## test: ") and "| resid_post.1 |" in latest.stdout
    missing = CliRunner().invoke(app, ["show", "0" * 32, "--tracking-uri", cfg.tracking_uri])
    assert missing.exit_code == 2
    assert f"error: no MLflow run '{'0' * 32}' at {cfg.tracking_uri}" in missing.output
    child = client.search_runs(
        [client.get_run(first["run_id"]).info.experiment_id],
        max_results=1,
        filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'",
    )[0]
    nested = CliRunner().invoke(app, ["show", child.info.run_id, "--tracking-uri", cfg.tracking_uri])
    assert nested.exit_code == 2 and "has no results table: it is not a pipeline or sweep parent run" in nested.output


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"saeflow {version('saeflow')}"


def test_every_architecture_trains_through_the_pipeline_config(prefect_server, tiny_gpt2_dir, tmp_path):
    archs = sorted(ARCHITECTURES)  # every registered architecture
    cfg = tiny_config(
        str(tmp_path),
        tiny_gpt2_dir,
        extract={"sites": ["resid_post.1"], "batch_size": 16},
        saes=[{"architecture": a, "expansion_factor": 2} for a in archs],
        eval={"batch_size": 8, "latent_report": False},
    )
    out = sae_pipeline(cfg)
    metrics = out["metrics"]["resid_post.1"]
    assert sorted(label.split("-")[0] for label in metrics) == sorted(archs)
    client = MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    for a in archs:
        name = f"saeflow.{os.path.basename(cfg.model.name)}.resid_post.1.{a}"
        version = client.get_model_version_by_alias(name, "current")
        sae = saeflow.load_sae(f"{name}/{version.version}", tracking_uri=cfg.tracking_uri)
        assert sae.cfg.architecture == a
    for label, m in metrics.items():
        assert 0 <= m["fvu"] < 1.5 and m["l0"] > 0 and "ce_loss_recovered" in m, label
