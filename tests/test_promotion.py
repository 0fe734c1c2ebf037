"""The promotion gate, the retrain flow and the registered MLflow models, through a real Prefect server and a real
SQLite MLflow registry: a better challenger becomes champion, a worse one does not, a manual promote is recorded;
the pyfunc model encodes exactly like saeflow.load_sae; nothing is pickled."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

import saeflow
from saeflow.cli import app
from saeflow.flows.pipeline import sae_pipeline
from saeflow.flows.retrain import sae_retrain
from tests.conftest import tiny_config

SITE = "resid_post.1"
LABEL = "topk-x4-k8"


def gate_config(root, model_dir, **overrides):
    # FVU: the tiny GPT-2 has random weights, so its CE loss recovered is noise; the default metric for a model
    # with an LM head (CE recovered) is checked in test_promotion_rule.
    return tiny_config(
        root,
        model_dir,
        extract={"sites": [SITE], "batch_size": 16},
        promotion={"metric": "fvu"},
        saes=[{"architecture": "topk", "k": 8, "expansion_factor": 4}],
        eval={"batch_size": 8, "latent_report": False, "afa": False},
        **overrides,
    )


def under_trained(cfg):
    """The same SAE trained on one batch: a deliberately worse challenger at the same L0 (TopK: L0 = k)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"tokens": 256})})


def flow_run_artifacts(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )

    return {a.key: a for a in asyncio.run(read())}


@pytest.fixture(scope="module")
def gated(prefect_server, tiny_gpt2_dir, tmp_path_factory):
    """v1 under-trained (first: champion), v2 fully trained (better: promoted), v3 under-trained (worse: not)."""
    cfg = gate_config(str(tmp_path_factory.mktemp("gate")), tiny_gpt2_dir)
    outs = [sae_pipeline(under_trained(cfg)), sae_pipeline(cfg), sae_pipeline(under_trained(cfg))]
    name = outs[0]["promotions"][SITE][LABEL]["name"]
    return cfg, outs, name


def version(cfg, name, v):
    return MlflowClient(cfg.tracking_uri, cfg.tracking_uri).get_model_version(name, str(v))


def alias_version(cfg, name, alias):
    return str(MlflowClient(cfg.tracking_uri, cfg.tracking_uri).get_model_version_by_alias(name, alias).version)


def test_first_version_is_champion_better_is_promoted_worse_is_not(gated):
    cfg, outs, name = gated
    decisions = [o["promotions"][SITE][LABEL] for o in outs]
    assert [d["version"] for d in decisions] == ["1", "2", "3"]
    assert [d["promoted"] for d in decisions] == [True, True, False]
    fvu = [o["metrics"][SITE][LABEL]["fvu"] for o in outs]
    assert fvu[1] < fvu[0] - cfg.promotion.margin and fvu[2] > fvu[1]
    assert alias_version(cfg, name, "champion") == "2"
    assert alias_version(cfg, name, "challenger") == "3"
    assert alias_version(cfg, name, "current") == "3"
    v2, v3 = version(cfg, name, 2), version(cfg, name, 3)
    assert v2.tags["promotion.decision"] == "promoted" and v2.tags["promotion.champion_version"] == "1"
    assert v3.tags["promotion.decision"] == "rejected" and v3.tags["promotion.champion_version"] == "2"
    assert v3.tags["promotion.metric"] == "fvu"
    assert float(v3.tags["promotion.champion_value"]) == pytest.approx(fvu[1], rel=1e-5)
    assert float(v3.tags["promotion.challenger_value"]) == pytest.approx(fvu[2], rel=1e-5)
    assert "Not promoted" in v3.description and "Promoted to champion" in v2.description
    # both sides were scored on the same held-out tokens, so the champion was not re-scored
    assert v3.tags["eval_tokens_hash"] == v2.tags["eval_tokens_hash"] and "promotion.champion_rescored" not in v3.tags
    for key in (
        "l0",
        "fvu",
        "ce_loss_recovered",
        "dead_fraction",
        "site",
        "architecture",
        "d_in",
        "d_sae",
        "data_hash",
        "config_hash",
        "train_hash",
        "code_version",
        "seed",
    ):
        assert key in v3.tags, key
    assert (v3.tags["d_in"], v3.tags["d_sae"]) == ("64", "256")
    model = MlflowClient(cfg.tracking_uri, cfg.tracking_uri).get_registered_model(name)
    assert model.tags["site"] == SITE and model.tags["lm"] == cfg.model.name and "champion" in model.description


def test_the_results_artifact_and_links_are_on_the_prefect_flow_run(gated):
    cfg, outs, name = gated
    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(outs[2]["run_id"])
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    arts = flow_run_artifacts(flow_run_id)
    table = arts["sae-results"].data
    assert f"| resid_post.1 | {LABEL} |" in table and f"{name} v3" in table and "challenger:" in table
    assert f"({outs[2]['mlflow_url']})" in arts["mlflow-run"].data  # a link artifact (Prefect renders it as markdown)
    assert "#/experiments/" in outs[2]["mlflow_url"]


def test_an_eval_set_change_rescores_the_champion_on_the_new_tokens(gated, tiny_gpt2_dir):
    cfg, _, name = gated
    more = cfg.model_copy(update={"tokens": cfg.tokens.model_copy(update={"eval_tokens": 768})})
    out = sae_pipeline(under_trained(more))
    d = out["promotions"][SITE][LABEL]
    v = version(cfg, name, d["version"])
    assert d["rescored"] and v.tags["promotion.champion_rescored"] == "true"
    assert v.tags["eval_tokens_hash"] != version(cfg, name, 2).tags["eval_tokens_hash"]
    assert not d["promoted"] and alias_version(cfg, name, "champion") == "2"


def test_manual_promote_moves_the_alias_and_is_recorded(gated):
    cfg, _, name = gated
    r = CliRunner().invoke(app, ["promote", name, "3", "--tracking-uri", cfg.tracking_uri])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{name}@champion -> v3 (was v2)"
    assert alias_version(cfg, name, "champion") == "3"
    v3 = version(cfg, name, 3)
    assert v3.tags["promotion.decision"] == "manual" and v3.tags["promotion.replaced_version"] == "2"
    assert "promotion.manual.champion" in v3.tags and "Manually made champion" in v3.description
    r = CliRunner().invoke(app, ["promote", name, "99", "--tracking-uri", cfg.tracking_uri])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error:") and "no version '99'" in r.stderr
    r = CliRunner().invoke(app, ["models", "*topk", "--tracking-uri", cfg.tracking_uri])
    assert r.exit_code == 0, r.output
    rows = {line.split()[1]: line for line in r.stdout.splitlines()[1:] if line.startswith(name)}
    assert "champion" in rows["3"] and "manual" in rows["3"]
    assert "challenger" in rows["4"]  # the newest version, from the eval-set test
    assert "promoted" in rows["2"] and "champion" not in rows["2"]


def test_pyfunc_model_encodes_like_load_sae_and_nothing_is_pickled(gated):
    import mlflow

    from saeflow.storage.tracking import process_uris

    cfg, _outs, name = gated
    with process_uris(cfg.tracking_uri):  # as `mlflow.set_tracking_uri(...)` would, without leaking to other tests
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    spec = model.metadata.signature
    assert [(t.type, t.shape) for t in spec.inputs.inputs] == [(np.dtype("float32"), (-1, 64))]
    assert [(t.type, t.shape) for t in spec.outputs.inputs] == [(np.dtype("float32"), (-1, 256))]
    assert spec.params.to_dict() == [{"name": "output", "type": "string", "default": "codes", "shape": None}]
    x = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32) * 3
    sae = saeflow.load_sae(f"{name}@champion", tracking_uri=cfg.tracking_uri)
    with torch.no_grad():
        codes = sae.encode_raw(torch.from_numpy(x)).numpy()
        recon = sae.reconstruct_raw(torch.from_numpy(x)).numpy()
    assert np.array_equal(model.predict(x), codes)
    assert np.array_equal(model.predict(x, params={"output": "reconstruction"}), recon)
    assert (codes > 0).sum(axis=1).max() <= 8  # TopK k=8
    pickled = [
        os.path.join(d, f)
        for d, _, files in os.walk(cfg.root)
        for f in files
        if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))
    ]
    assert pickled == []
    with open(os.path.join(model._model_meta.artifact_path.removeprefix("file://"), "MLmodel")) as f:
        mlmodel = f.read()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model.pkl" not in mlmodel


def test_promotion_rule():
    from saeflow.sae.evaluation.promotion import decide, promotion_metric

    assert promotion_metric("auto", True) == "ce_loss_recovered" and promotion_metric("auto", False) == "fvu"
    champ = {"ce_loss_recovered": 0.90, "fvu": 0.20, "l0": 32}
    assert decide("ce_loss_recovered", {"ce_loss_recovered": 0.92, "l0": 35}, champ, "4", 0.01, 1.1).promoted
    at_margin = decide("ce_loss_recovered", {"ce_loss_recovered": 0.905, "l0": 32}, champ, "4", 0.01, 1.1)
    assert not at_margin.promoted and "below the margin" in at_margin.reason
    dense = decide("ce_loss_recovered", {"ce_loss_recovered": 0.99, "l0": 36}, champ, "4", 0.01, 1.1)
    assert not dense.promoted and "L0 36 exceeds 1.1 x" in dense.reason
    assert decide("fvu", {"fvu": 0.15, "l0": 30}, champ, "4", 0.01, 1.1).promoted
    assert not decide("fvu", {"fvu": 0.25, "l0": 30}, champ, "4", 0.01, 1.1).promoted
    first = decide("fvu", {"fvu": 0.9, "l0": 300}, None, None, 0.01, 1.1)
    assert first.promoted and first.tags()["promotion.reason"] == "first version of this model"


def test_retrain_skips_unchanged_data_and_retrains_when_the_data_grows(prefect_server, tiny_gpt2_dir, tmp_path):
    from saeflow.storage.text import python_docs_texts

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [row["text"] for _, row in zip(range(400), python_docs_texts())]
    (corpus / "a.txt").write_text("\n".join(texts[:200]))
    cfg = gate_config(
        str(tmp_path / "work"),
        tiny_gpt2_dir,
        dataset={"source": str(corpus)},
        tokens={"context_size": 32, "train_tokens": 2048, "eval_tokens": 256},
    )
    first = sae_retrain(cfg)
    assert not first["skipped"] and first["promotions"][SITE][LABEL]["promoted"]
    again = sae_retrain(cfg)
    assert again["skipped"] and "unchanged" in again["reason"]
    seeded = sae_retrain(
        cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"when_unchanged": "new_seed"})})
    )
    assert not seeded["skipped"] and "new seed 1" in seeded["reason"]
    name = first["promotions"][SITE][LABEL]["name"]
    assert version(cfg, name, 2).tags["seed"] == "1"
    (corpus / "0-new.txt").write_text("\n".join(texts[200:]))  # new file, read first: new token + activation stores
    grown = sae_retrain(cfg)
    assert not grown["skipped"] and "data changed" in grown["reason"]
    stores = os.listdir(os.path.join(cfg.store_url, "tokens"))
    assert len(stores) == 2 and len(os.listdir(os.path.join(cfg.store_url, "activations"))) == 2
    assert version(cfg, name, 3).tags["data_hash"] != version(cfg, name, 1).tags["data_hash"]
