"""`saeflow evaluate` on any SAE: a saeflow checkpoint and its SAELens export give the same numbers, a registered
model resolves by alias, and an SAE that does not fit the model/site fails with one `error:` line (exit 2)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from saeflow.cli import app
from saeflow.config import load_config
from saeflow.sae import ReLUConfig, build_sae
from saeflow.storage.checkpoints import save_sae
from saeflow.storage.sae_sources import site_from_hook
from saeflow.storage.saelens import export_saelens, hook_name_for_site
from saeflow.tasks.common import tracker
from saeflow.tasks.sae_reference import load_reference, resolve_sae_reference

SITE = "resid_post.1"
PLOTS = {"plots/feature_density.png", "plots/zf.png", "plots/decoder_cosines.png"}


def random_sae(d_in: int = 64, seed: int = 0):
    """A trained-looking ReLU SAE with a non-trivial input scale (so SAELens export must fold it in)."""
    torch.manual_seed(seed)
    sae = build_sae(ReLUConfig(d_sae=128), d_in)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.normal_(std=0.1)
        sae.input_scale.fill_(3.7)
    return sae.eval()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_gpt2_dir):
    """One config (so one MLflow database and token store) for the whole module."""
    tmp_path = tmp_path_factory.mktemp("evaluate-cli")
    data = {
        "name": "eval-test",
        "root": str(tmp_path / "work"),
        "model": {"name": tiny_gpt2_dir},
        "tokens": {"context_size": 32, "train_tokens": 32, "eval_tokens": 384},
        "extract": {"sites": [SITE]},
        "eval": {"batch_size": 6, "n_latents": 4, "n_extreme_latents": 2, "top_contexts": 3, "zf_points": 500},
    }
    p = tmp_path / "eval.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def invoke(*args):
    return CliRunner().invoke(app, ["evaluate", *args])


def error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


def run_id_of(result) -> str:
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("MLflow run:"))
    return line.split()[2]


def test_saelens_export_evaluates_like_the_original_checkpoint(prefect_server, config_file, tmp_path):
    sae = random_sae()
    ckpt = save_sae(sae, str(tmp_path / "ckpt"), {"site": SITE})
    lens = export_saelens(sae, str(tmp_path / "lens"), hook_name_for_site(SITE))
    a = invoke(ckpt, "--config", config_file)
    assert a.exit_code == 0, a.output
    b = invoke(lens, "--config", config_file, "--site", SITE)
    assert b.exit_code == 0, b.output
    assert "fvu" in a.stdout and "afa_eps_lbo_median" in a.stdout  # the printed metric table
    cfg = load_config(config_file)
    client = MlflowClient(cfg.tracking_uri)
    ma, mb = (client.get_run(run_id_of(r)).data.metrics for r in (a, b))
    assert set(ma) == set(mb)
    for key in (
        "eval/fvu",
        "eval/cosine_sim",
        "eval/l0",
        "eval/ce_loss_recovered",
        "eval/ce_loss_recovered_mean",
        "eval/kl_div",
        "eval/shrinkage_gamma",
        "eval/afa_eps_lbo_median",
        "eval/decoder_cos_max",
    ):
        assert key in ma, key
    for key in ma:  # import unfolds the exported scale, so even normalized-unit MSE agrees
        assert mb[key] == pytest.approx(ma[key], rel=2e-4, abs=1e-6), key
    for r in (a, b):
        rid = run_id_of(r)
        arts = {f.path for d in ("plots", "reports", "eval") for f in client.list_artifacts(rid, d)}
        assert PLOTS | {"reports/latents.html", "eval/firing_frequency.npy", "eval/metrics.json"} <= arts
        for png in PLOTS:
            with open(client.download_artifacts(rid, png, str(tmp_path)), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        page = open(client.download_artifacts(rid, "reports/latents.html", str(tmp_path))).read()
        assert "<span class='hit'>" in page
        assert client.get_run(rid).info.status == "FINISHED"


def test_registered_model_reference_resolves_to_the_same_sae(config_file, tmp_path):
    cfg = load_config(config_file)
    sae = random_sae(seed=1)
    ckpt = save_sae(sae, str(tmp_path / "ckpt"), {"site": SITE})
    tr = tracker(cfg)  # the config's experiment, artifacts under its root
    run_id = tr.start_run("registered")
    tr.log_artifacts(run_id, ckpt, "sae")
    tr.set_alias("tiny.relu", "current", tr.register("tiny.relu", run_id, "sae", {}))
    ref = resolve_sae_reference.fn(cfg, "tiny.relu@current")
    assert (ref.kind, ref.site) == ("registry", SITE)
    for x, y in zip(load_reference(ref).state_dict().values(), sae.state_dict().values()):
        assert torch.equal(x, y)


def test_downloads_go_to_one_place_under_the_root_and_leave_no_temporary_directories(
    config_file, tmp_path, monkeypatch
):
    import tempfile

    import saeflow

    cfg = load_config(config_file)
    ckpt = save_sae(random_sae(seed=2), str(tmp_path / "ckpt"), {"site": SITE})
    tr = tracker(cfg)
    run_id = tr.start_run("registered")
    tr.log_artifacts(run_id, ckpt, "sae")
    tr.set_alias("tiny.leak", "current", tr.register("tiny.leak", run_id, "sae", {}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    first = resolve_sae_reference.fn(cfg, "tiny.leak@current")
    again = resolve_sae_reference.fn(cfg, "tiny.leak@current")
    assert first.path == again.path and first.path.startswith(os.path.join(cfg.root, "downloads", "tiny.leak_current-"))
    umask = os.umask(0)
    os.umask(umask)
    modes = {n: os.stat(os.path.join(first.path, n)).st_mode & 0o777 for n in os.listdir(first.path)}
    assert modes == {"cfg.json": 0o666 & ~umask, "sae_weights.safetensors": 0o666 & ~umask}  # one policy
    mine = [d for d in os.listdir(os.path.join(cfg.root, "downloads")) if d.startswith("tiny.leak")]
    assert len(mine) == 1  # replaced, not piled up (the module's root is shared with other tests)
    saeflow.load_sae("tiny.leak@current", tracking_uri=cfg.tracking_uri)
    assert os.listdir(scratch) == []  # saeflow.load_sae loads into memory and removes its download


def test_d_model_mismatch_fails_with_one_line(config_file, tmp_path):
    ckpt = save_sae(random_sae(d_in=32), str(tmp_path / "narrow"), {"site": SITE})
    r = invoke(ckpt, "--config", config_file)
    assert r.exit_code == 2
    (line,) = error_lines(r)
    assert "d_in 32" in line and "width 64" in line


def test_declared_shapes_are_checked_against_the_weights_before_anything_is_built(config_file, tmp_path):
    """A cfg.json declaring d_in 200000 / d_sae 2000000 would allocate 1.6 TB; it is refused from the header."""
    import json

    ckpt = save_sae(random_sae(), str(tmp_path / "huge"), {"site": SITE})
    with open(os.path.join(ckpt, "cfg.json")) as f:
        cfg = json.load(f)
    cfg["d_in"], cfg["sae"]["d_sae"] = 200_000, 2_000_000
    with open(os.path.join(ckpt, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    r = invoke(ckpt, "--config", config_file)
    assert r.exit_code == 2
    (line,) = error_lines(r)
    assert line == (
        f"error: {ckpt}: cfg.json declares d_in 200000, d_sae 2000000 but sae_weights.safetensors holds W_enc "
        "(64, 128), W_dec (128, 64): the files do not belong together; save or pull it again"
    )


def test_garbage_weights_fail_with_one_line(config_file, tmp_path):
    ckpt = save_sae(random_sae(), str(tmp_path / "garbage"), {"site": SITE})
    with open(os.path.join(ckpt, "sae_weights.safetensors"), "wb") as f:
        f.write(b"\x00" * 7)
    r = invoke(ckpt, "--config", config_file)
    assert r.exit_code == 2
    (line,) = error_lines(r)
    assert line.startswith(f"error: {ckpt}/sae_weights.safetensors is not a readable safetensors file (")
    assert line.endswith("): save or pull the SAE again")


@pytest.mark.parametrize(
    "site, words",
    [("resid_post.2", "trained at resid_post.1"), ("resid_post.9", "layers 0..2"), ("attn.1", "bad site")],
)
def test_wrong_site_fails_with_one_line(config_file, tmp_path, site, words):
    ckpt = save_sae(random_sae(), str(tmp_path / "ckpt"), {"site": SITE})
    r = invoke(ckpt, "--config", config_file, "--site", site)
    assert r.exit_code == 2
    (line,) = error_lines(r)
    assert words in line


def test_missing_directory_and_unrecorded_site_fail_with_one_line(config_file, tmp_path):
    r = invoke(str(tmp_path / "nowhere" / "sae"), "--config", config_file)
    assert r.exit_code == 2 and "does not exist" in error_lines(r)[0]
    ckpt = save_sae(random_sae(), str(tmp_path / "nosite"))
    r = invoke(ckpt, "--config", config_file)
    assert r.exit_code == 2 and "--site" in error_lines(r)[0]


def test_saelens_hook_names_map_to_sites():
    assert site_from_hook("blocks.3.hook_resid_post") == "resid_post.3"
    assert site_from_hook("blocks.3.hook_mlp_out") == "mlp_out.3"
    assert site_from_hook("blocks.3.hook_resid_pre") == "resid_post.2"
    assert site_from_hook("blocks.0.hook_resid_pre") is None and site_from_hook("blocks.1.attn.hook_z") is None


def test_a_checkpoint_is_evaluated_without_the_outlier_rows_its_training_left_out(config_file, tmp_path):
    from saeflow.sae.lm.sites import run_to_sites
    from saeflow.storage.tokens import open_token_store, read_windows
    from saeflow.tasks.common import loaded_model, token_store_url

    cfg = load_config(config_file)
    sae = random_sae(seed=1)
    plain = invoke(save_sae(sae, str(tmp_path / "plain"), {"site": SITE}), "--config", config_file)
    assert plain.exit_code == 0, plain.output  # also writes the token store read below
    ids = torch.as_tensor(read_windows(open_token_store(token_store_url(cfg)[0]), "eval").astype("int64"))
    with torch.no_grad():
        norms = run_to_sites(loaded_model(cfg).model, ids, [SITE])[SITE][:, 1:].norm(dim=-1).flatten()
    threshold = float(norms.quantile(0.9))  # what training would have recorded: the top tenth are outliers
    ckpt = save_sae(sae, str(tmp_path / "with-threshold"), {"site": SITE, "outlier_norm_threshold": threshold})
    cut = invoke(ckpt, "--config", config_file)
    assert cut.exit_code == 0, cut.output
    client = MlflowClient(cfg.tracking_uri)
    mp, mc = (client.get_run(run_id_of(r)).data for r in (plain, cut))
    assert mp.metrics["eval/outlier_rows_excluded"] == 0
    assert mc.metrics["eval/outlier_rows_excluded"] == int((norms > threshold).sum()) > 0
    assert float(mc.params["outlier_norm_threshold"]) == pytest.approx(threshold)
    assert mc.metrics["eval/fvu"] != mp.metrics["eval/fvu"]  # the reconstruction metrics saw fewer rows
    assert mc.metrics["eval/ce_loss_spliced"] == pytest.approx(mp.metrics["eval/ce_loss_spliced"])  # CE: every row
