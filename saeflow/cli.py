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
def validate(
    config: str = typer.Argument(..., help="YAML config to check."),
    set_: list[str] = typer.Option([], "--set", "-s"),
) -> None:
    """Check a config without running anything."""
    cfg = _config(config, set_)
    typer.echo(f"ok: {config} — model {cfg.model.name}, sites {cfg.extract.sites}, {len(cfg.saes)} SAEs")


@app.command()
def pull(
    ref: str = typer.Argument(..., help="Registered model: NAME, NAME@ALIAS or NAME/VERSION."),
    dst: str = typer.Argument(..., help="Directory to download the SAE into."),
    tracking_uri: str = typer.Option(None, help="MLflow URI; default $MLFLOW_TRACKING_URI or ./saeflow-data."),
) -> None:
    """Download a registered SAE (safetensors + cfg.json); load it with saeflow.load_sae(DIR)."""
    from storage.tracking import pull as pull_model

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath("saeflow-data/mlflow.db")
    try:
        path = pull_model(ref, dst, uri)
    except ValueError as e:
        _fail(str(e))
    typer.echo(path)


def main() -> None:  # pragma: no cover
    sys.exit(app())
