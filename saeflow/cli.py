"""The `saeflow` command line: run or serve the flows, validate a config, list, promote and pull registered SAEs."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import typer

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate and register SAEs.")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _fail(msg: str, exc: BaseException | None = None, code: int = 2) -> NoReturn:
    """Print `error: msg` (one line, secrets redacted) and exit with `code`; `exc`'s traceback goes to the log file
    of the command, and to the console as well under --debug."""
    from saeflow import console
    from saeflow.env import redact

    if exc is not None:
        console.record_failure(redact(msg), exc)
    typer.secho(f"error: {redact(msg)}", fg="red", err=True)
    raise typer.Exit(code)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"saeflow {version('saeflow')}")
        raise typer.Exit()


@app.callback()
def _options(
    _: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (they always go to the log file)."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show the INFO logs of Dask, MLflow and the servers too (the log file has them)."
    ),
) -> None:
    from saeflow import console

    console.DEBUG = console.DEBUG or debug
    console.VERBOSE = console.VERBOSE or verbose


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the flow closes its runs (FAILED) and keeps its checkpoints."""


def _on_signal(signum, frame) -> None:
    """Ctrl-C / SIGTERM: interrupt the command, though never in the middle of a write to the tracking store."""
    from saeflow.storage.interrupts import interrupt

    interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


@contextlib.contextmanager
def _prefect_api() -> Iterator[None]:
    """The configured Prefect API (checked before anything is written: one that is down fails with one line, not
    after minutes of client retries), or a temporary local server that lives exactly as long as this command."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from saeflow.local_server import temporary_prefect_server

    with temporary_prefect_server():
        yield


def _execute(command: str, root: str | None, call: Callable[[], T]) -> T:
    """Run a flow command: its log to a file, the Prefect API it needs, and every failure of the input or of the
    machine (full disk, read-only root), and Ctrl-C or SIGTERM, as one `error:` line; anything else is a bug and
    keeps its traceback."""
    from prefect.settings import PREFECT_API_URL

    from saeflow import console
    from saeflow.api import USER_ERRORS, environment_failure

    if PREFECT_API_URL.value():
        _prefect_api_or_fail()
    console.start_logging(command, root)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        with _prefect_api():
            return call()
    except USER_ERRORS as e:
        _fail(str(e).strip("'\""), e)
    except KeyboardInterrupt as e:
        how, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        _fail(
            f"interrupted ({how}): its MLflow runs are marked FAILED; rerun the same command to resume (finished "
            "stages are reused, training continues from its last checkpoint)",
            e,
            code,
        )
    except Exception as e:
        msg = environment_failure(e, root)
        if msg is None:
            raise
        _fail(msg, e)


def _config(path: str | None, overrides: list[str]):
    from saeflow.api import load_config
    from saeflow.config import ConfigError

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
    from saeflow.flows.pipeline import sae_pipeline

    out = _execute("run", cfg.root, lambda: sae_pipeline(cfg))
    typer.echo(f"MLflow parent run: {out['run_id']}  (tracking URI {cfg.tracking_uri})")
    for site, per_sae in out["metrics"].items():
        for label, m in per_sae.items():
            ce = f"  CE recovered {m['ce_loss_recovered']:.3f}" if "ce_loss_recovered" in m else ""
            p = out["promotions"].get(site, {}).get(label)
            gate = f"  v{p['version']} {'champion' if p['promoted'] else 'challenger'}" if p else ""
            typer.echo(f"{site:>14}  {label:<24} FVU {m['fvu']:.4f}  L0 {m['l0']:7.1f}{ce}{gate}")


@app.command()
def sweep(
    config: str = typer.Argument(..., help="YAML config with a `sweep:` section, e.g. configs/sweep-demo.yaml."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set 'sweep.architectures.topk.k=[8,16]'"),
) -> None:
    """Run sae_sweep: train and evaluate the grid, then log L0–fidelity frontiers and the needed-L0 table."""
    cfg = _config(config, set_)
    if cfg.sweep is None:
        _fail(f"{config} has no `sweep:` section (see configs/sweep-demo.yaml); use `saeflow run` for plain runs")
    from saeflow.api import higher_is_better
    from saeflow.flows.sweep import sae_sweep

    out = _execute("sweep", cfg.root, lambda: sae_sweep(cfg))
    typer.echo(
        f"MLflow parent run: {out['run_id']}  (tracking URI {cfg.tracking_uri}); frontier/ holds the plots "
        "and comparison table"
    )
    for r in out["comparison"]:
        op = "≥" if higher_is_better(r["metric"]) else "≤"
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
    """Evaluate any SAE on the config's held-out tokens (MATH §5, §5.1) and log it to a new MLflow run."""
    cfg = _config(config, set_)
    from saeflow.api import check_sae_reference
    from saeflow.flows.evaluate import evaluate_sae

    def call():
        check_sae_reference(cfg, sae, site)  # fail fast, with one line, before Prefect starts a flow run
        return evaluate_sae(cfg, sae, site)

    out = _execute("evaluate", cfg.root, call)
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
    from saeflow.api import pull as pull_model

    try:
        path = pull_model(ref, dst, tracking_uri)
    except ValueError as e:
        _fail(str(e))
    typer.echo(path)


@app.command()
def show(
    run_id: str = typer.Argument("latest", help="MLflow parent run id (`saeflow run` prints it); default the newest."),
    tracking_uri: str = typer.Option(None, help="MLflow URI; default $MLFLOW_TRACKING_URI or ./saeflow-data."),
) -> None:
    """Print the results table of a pipeline or sweep run: held-out metrics and promotion per SAE."""
    from saeflow.api import results_table

    try:
        typer.echo(results_table(run_id, tracking_uri), nl=False)
    except ValueError as e:
        _fail(str(e))


@app.command()
def export(
    source: str = typer.Argument(..., help="Registered model NAME, NAME@ALIAS or NAME/VERSION, or an SAE directory."),
    dst: str = typer.Argument(..., help="New (or empty) directory to write into."),
    fmt: str = typer.Option("saelens", "--format", help="Output format: saelens (SAELens' inference SAE format)."),
    tracking_uri: str = typer.Option(None, help="MLflow URI; default $MLFLOW_TRACKING_URI or ./saeflow-data."),
) -> None:
    """Write an SAE in another library's format; `SAE.load_from_disk(DST)` loads it in SAELens."""
    from saeflow.api import export as export_sae

    try:
        path = export_sae(source, dst, fmt, tracking_uri)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(path)


def _prefect_api_or_fail() -> str:
    """The Prefect API URL serve/deploy register with; fails with one line when none is set or it is down."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        _fail(
            "no Prefect API is configured: start one with `prefect server start` and run "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        _fail(f"the Prefect API at {url} does not answer ({type(e).__name__}): start it with `prefect server start`")
    return url


def _describe_deployments(cfg, url: str) -> None:
    from saeflow.flows.deployments import NIGHTLY, next_nightly_run

    r = cfg.retrain
    typer.echo(
        f"Prefect API {url}: deployments sae_pipeline/{cfg.name}, sae_sweep/{cfg.name}, "
        f"evaluate_sae/{cfg.name}, sae_retrain/{NIGHTLY}"
    )
    typer.echo(
        f"sae_retrain/{NIGHTLY}: cron '{r.cron}' ({r.timezone}); next run "
        f"{next_nightly_run(cfg):%Y-%m-%d %H:%M %Z}; when nothing changed: {r.when_unchanged}"
    )


@app.command()
def serve(
    config: str = typer.Argument(DEFAULT_CONFIG, help="YAML config whose values are the run forms' defaults."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set retrain.cron='0 3 * * *'"),
    limit: int = typer.Option(1, help="Flow runs executed at the same time by this process."),
) -> None:
    """Serve the flows (Prefect `serve`, no work pool): start runs from the UI; sae_retrain runs nightly."""
    cfg = _config(config, set_)
    url = _prefect_api_or_fail()
    from prefect import serve as prefect_serve

    from saeflow.flows.deployments import build_deployments

    deployments = build_deployments(cfg)
    _describe_deployments(cfg, url)
    prefect_serve(*deployments, limit=limit)


@app.command()
def deploy(
    config: str = typer.Argument(DEFAULT_CONFIG, help="YAML config whose values are the run forms' defaults."),
    pool: str = typer.Option(..., "--pool", help="Work pool whose workers run the flows (`prefect work-pool ls`)."),
    source: str = typer.Option(None, help="Where workers get the code: a directory or git URL; default this checkout."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key."),
) -> None:
    """Register the deployments with a work pool; start workers with `prefect worker start --pool NAME`."""
    cfg = _config(config, set_)
    url = _prefect_api_or_fail()
    from prefect import deploy as prefect_deploy
    from prefect.client.orchestration import get_client

    from saeflow.flows.deployments import REPO_ROOT, build_deployments

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except Exception:
            _fail(
                f"work pool {pool!r} does not exist: create it with `prefect work-pool create {pool} --type "
                "process` (or list them with `prefect work-pool ls`)"
            )
    ids: list = prefect_deploy(  # type: ignore[assignment]  # sync_compatible: a list when called from sync code
        *build_deployments(cfg, source or REPO_ROOT),
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
    )
    _describe_deployments(cfg, url)
    typer.echo(f"{len(ids)} deployments in work pool {pool!r}; run them with: prefect worker start --pool {pool}")


@app.command()
def models(
    pattern: str = typer.Argument("*", help="Glob over registered model names, e.g. '*resid_post.15*'."),
    tracking_uri: str = typer.Option(None, help="MLflow URI; default $MLFLOW_TRACKING_URI or ./saeflow-data."),
) -> None:
    """List registered SAEs: versions, aliases, held-out metrics and the promotion gate's decision."""
    from saeflow.api import list_models

    try:
        rows = list_models(pattern, tracking_uri)
    except ValueError as e:
        _fail(str(e))
    if not rows:
        typer.echo(f"no registered model matches {pattern!r}")
        return

    def f(m: dict, k: str) -> str:
        return f"{m[k]:.4g}" if k in m else "–"

    typer.echo(f"{'model':<44} {'ver':>4} {'aliases':<28} {'L0':>7} {'FVU':>7} {'CE rec':>7} {'dead':>6}  decision")
    for r in rows:
        typer.echo(
            f"{r.name:<44} {r.version:>4} {','.join(r.aliases):<28} {f(r.metrics, 'l0'):>7} "
            f"{f(r.metrics, 'fvu'):>7} {f(r.metrics, 'ce_loss_recovered'):>7} "
            f"{f(r.metrics, 'dead_fraction'):>6}  {r.decision}"
        )


@app.command()
def promote(
    name: str = typer.Argument(..., help="Registered model name (`saeflow models` lists them)."),
    version: str = typer.Argument(..., help="Version to point the alias at."),
    alias: str = typer.Option("champion", help="Alias to move."),
    tracking_uri: str = typer.Option(None, help="MLflow URI; default $MLFLOW_TRACKING_URI or ./saeflow-data."),
) -> None:
    """Move an alias (default champion) to a version by hand; the override is recorded on the version."""
    from saeflow.api import promote as promote_alias

    try:
        before = promote_alias(name, version, alias, tracking_uri)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{name}@{alias} -> v{version}" + (f" (was v{before})" if before else ""))


def main() -> None:  # pragma: no cover
    sys.exit(app())
