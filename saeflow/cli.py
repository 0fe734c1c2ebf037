"""The `saeflow` command line: run the pipeline, validate a config, pull a registered SAE."""

from __future__ import annotations

import os
import sys

import typer

import saeflow  # noqa: F401  (offline defaults)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate and register SAEs.")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _config(path: str | None, overrides: list[str]):
    from saeflow.config import ConfigError, load_config

    try:
        return load_config(path, overrides)
    except ConfigError as e:
        _fail(str(e))


@app.command()
def run(
    config: str = typer.Argument(DEFAULT_CONFIG, help="YAML config (default: the offline demo)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set tokens.train_tokens=50000"),
) -> None:
    """Run sae_pipeline: tokenize → extract → stats → train → evaluate → register."""
    cfg = _config(config, set_)
    from flows.pipeline import sae_pipeline
    from sae.models import ModelLoadError
    from sae.sites import SiteError

    try:
        out = sae_pipeline(cfg)
    except (ModelLoadError, SiteError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(f"MLflow parent run: {out['run_id']}  (tracking URI {cfg.tracking_uri})")
    for site, per_sae in out["metrics"].items():
        for label, m in per_sae.items():
            ce = f"  CE recovered {m['ce_loss_recovered']:.3f}" if "ce_loss_recovered" in m else ""
            typer.echo(f"{site:>14}  {label:<24} FVU {m['fvu']:.4f}  L0 {m['l0']:7.1f}{ce}")


@app.command()
def sweep(
    config: str = typer.Argument(..., help="YAML config with a `sweep:` section, e.g. configs/sweep-demo.yaml."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set 'sweep.architectures.topk.k=[8,16]'"),
) -> None:
    """Run sae_sweep: train and evaluate the grid, then log L0–fidelity frontiers and the needed-L0 table."""
    cfg = _config(config, set_)
    if cfg.sweep is None:
        _fail(f"{config} has no `sweep:` section (see configs/sweep-demo.yaml); use `saeflow run` for plain runs")
    from flows.sweep import sae_sweep
    from sae.models import ModelLoadError
    from sae.sites import SiteError

    try:
        out = sae_sweep(cfg)
    except (ModelLoadError, SiteError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(f"MLflow parent run: {out['run_id']}  (tracking URI {cfg.tracking_uri}); frontier/ holds the plots "
               "and comparison table")
    for r in out["comparison"]:
        op = "≥" if r["metric"] == "ce_loss_recovered" else "≤"
        l0 = "n/a" if r["l0_needed"] is None else f"{'≤' if r['how'] == 'at_most' else ''}{r['l0_needed']:.1f}"
        ratio = "" if r["ratio_to_baseline"] is None else f"  ×{r['ratio_to_baseline']:.2f} baseline"
        typer.echo(f"{r['site']:>14}  {r['architecture']:<11} {r['metric']} {op} {r['level']:<5g} L0 {l0:>7}{ratio}")


@app.command()
def validate(
    config: str = typer.Argument(..., help="YAML config to check."),
    set_: list[str] = typer.Option([], "--set", "-s"),
) -> None:
    """Check a config without running anything."""
    cfg = _config(config, set_)
    typer.echo(f"ok: {config} — model {cfg.model.name}, sites {cfg.extract.sites}, {len(cfg.saes)} SAEs")


@app.command()
def evaluate(
    sae: str = typer.Argument(..., help="NAME@ALIAS, NAME/VERSION, a saeflow checkpoint dir or a SAELens SAE dir."),
    config: str = typer.Option(..., "--config", "-c", help="YAML config: model, dataset, tokens, eval, tracking."),
    site: str = typer.Option(None, "--site", help="Site to evaluate at; default: the site the SAE records."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set tokens.eval_tokens=4096"),
) -> None:
    """Evaluate any SAE on the config's held-out tokens (SPEC 5, 5.1) and log it to a new MLflow run."""
    cfg = _config(config, set_)
    from flows.evaluate import evaluate_sae
    from sae.models import ModelLoadError
    from tasks.sae_reference import resolve_sae_reference

    try:
        resolve_sae_reference.fn(cfg, sae, site)  # fail fast, with one line, before Prefect starts a flow run
        out = evaluate_sae(cfg, sae, site)
    except (ModelLoadError, FileNotFoundError, KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(f"MLflow run: {out['run_id']}  (tracking URI {cfg.tracking_uri})")
    typer.echo(f"{out['site']} · {out['label']}")
    for k, v in out["metrics"].items():
        typer.echo(f"  {k:<28} {v:.6g}")


@app.command()
def pull(
    ref: str = typer.Argument(..., help="Registered model: NAME, NAME@ALIAS or NAME/VERSION."),
    dst: str = typer.Argument(..., help="Directory to download the SAE into."),
    tracking_uri: str = typer.Option(None, help="MLflow URI; default $MLFLOW_TRACKING_URI or ./saeflow-data."),
) -> None:
    """Download a registered SAE (safetensors + cfg.json); load it with saeflow.load_sae(DIR)."""
    from storage.tracking import pull as pull_model

    uri = tracking_uri or saeflow.default_tracking_uri()
    try:
        path = pull_model(ref, dst, uri)
    except ValueError as e:
        _fail(str(e))
    typer.echo(path)


def main() -> None:  # pragma: no cover
    sys.exit(app())
