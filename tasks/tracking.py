from __future__ import annotations

from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.storage.tokens import TokenStoreRef
from saeflow.storage.tracking import code_version
from saeflow.tasks.common import TRACKING_RETRIES, prefect_run_tags, run_logger, tracker


@task(name="start-mlflow-run", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def start_pipeline_run(cfg: PipelineConfig, flow_name: str = "sae_pipeline") -> str:
    """Open the parent MLflow run and record the resolved config on it."""
    tr = tracker(cfg)
    orphans = tr.end_orphaned_runs()  # the flow holds the root: RUNNING runs of this root are a killed run's
    if orphans:
        run_logger().warning(f"marked {len(orphans)} MLflow runs a killed run left RUNNING as KILLED: {orphans}")
    tags = {"saeflow.flow": flow_name, "model": cfg.model.name, **prefect_run_tags()}
    commit = code_version()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = tr.start_run(cfg.name, tags=tags)
    dumped = cfg.model_dump(mode="json")
    tr.log_params(run_id, {k: v for k, v in dumped.items() if k != "saes"})
    tr.log_params(run_id, {"saes": [s.label() for s in cfg.saes]})
    tr.log_text(run_id, yaml.safe_dump(dumped, sort_keys=False), "config/resolved.yaml")
    run_logger().info(f"MLflow run {run_id} at {tr.tracking_uri}")
    return run_id


@task(name="log-token-manifest", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def log_token_manifest(cfg: PipelineConfig, run_id: str, tokens: TokenStoreRef) -> None:
    """The token store's manifest as an artifact and as the run's MLflow dataset input."""
    tr = tracker(cfg)
    manifest = tokens.manifest()
    tr.log_dict(run_id, manifest, "manifests/tokens.json")
    tr.log_dataset(
        run_id,
        f"tokens-{tokens.content_hash[:12]}",
        tokens.url,
        tokens.content_hash,
        {k: manifest[k] for k in ("shape", "n_train_windows", "n_eval_windows", "producing_config")},
    )


@task(name="finish-mlflow-run", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def finish_pipeline_run(cfg: PipelineConfig, run_id: str, results: dict[str, Any], status: str = "FINISHED") -> None:
    tr = tracker(cfg)
    if results:
        tr.log_dict(run_id, results, "eval/summary.json")
    tr.end_run(run_id, status)


def close_failed_run(cfg: PipelineConfig, run_id: str, results: dict[str, Any]) -> None:
    """Mark the parent run and every run of this root still RUNNING (nested runs a failing task could not close)
    FAILED (ending a run as failed gives back the space set aside on the root, so a full disk leaves room). A plain
    call, not a task: it runs while the flow fails or is interrupted, perhaps with its Prefect API gone, and must
    not wait on retries. If it cannot, the next run on the root marks them KILLED."""
    try:
        finish_pipeline_run.fn(cfg, run_id, results, status="FAILED")
        tracker(cfg).end_orphaned_runs("FAILED")
    except Exception as e:
        run_logger().warning(f"could not mark MLflow run {run_id} FAILED ({type(e).__name__}: {e})")


def _fmt(m: dict[str, Any], key: str) -> str:
    return f"{m[key]:.4g}" if m.get(key) is not None else "–"


def results_markdown(cfg: PipelineConfig, run_url: str, results: dict[str, Any], promotions: dict[str, Any]) -> str:
    """The flow run's outcome as a table: per SAE the held-out metrics and the promotion gate's decision."""
    lines = [
        f"## {cfg.name}: {cfg.model.name}",
        "",
        f"MLflow parent run: [{run_url}]({run_url})",
        "",
        "| site | SAE | registered | L0 | FVU | CE recovered | KL | dead | promotion |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for site, per_sae in results.items():
        for label, m in per_sae.items():
            p = promotions.get(site, {}).get(label)
            registered = f"{p['name']} v{p['version']}" if p else "–"
            if p is None:
                verdict = "–"
            elif p["promoted"]:
                verdict = "**champion**" + (f" (was v{p['champion_version']})" if p["champion_version"] else " (first)")
            else:
                verdict = f"challenger: {p['reason']}"
            lines.append(
                f"| {site} | {label} | {registered} | {_fmt(m, 'l0')} | {_fmt(m, 'fvu')} | "
                f"{_fmt(m, 'ce_loss_recovered')} | {_fmt(m, 'kl_div')} | {_fmt(m, 'dead_fraction')} | "
                f"{verdict} |"
            )
    return "\n".join(lines) + "\n"


HEADLINE_METRICS = ("fvu", "l0", "ce_loss_recovered", "kl_div", "dead_fraction")
"""Held-out metrics copied onto the parent run, so pipeline runs sort and compare in MLflow's run list."""


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`summary/<site>/<SAE>/<metric>` for every SAE, and `summary/best_<metric>` over them (the lowest FVU, KL
    and dead fraction, the highest CE recovered): one column per headline that every run of any config has."""
    out: dict[str, float] = {}
    for site, per_sae in results.items():
        for label, m in per_sae.items():
            out.update({f"summary/{site}/{label}/{k}": float(m[k]) for k in HEADLINE_METRICS if k in m})
    for k in ("fvu", "ce_loss_recovered", "kl_div", "dead_fraction"):
        values = [float(m[k]) for per_sae in results.values() for m in per_sae.values() if k in m]
        if values:
            out[f"summary/best_{k}"] = max(values) if k == "ce_loss_recovered" else min(values)
    return out


@task(name="publish-results", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def publish_results(
    cfg: PipelineConfig, run_id: str, results: dict[str, Any], promotions: dict[str, Any], summarize: bool = True
) -> str:
    """Prefect artifacts of the flow run: the results table (markdown) and a link to the MLflow parent run; the
    table is logged to the MLflow run too, and with `summarize` the headline metrics of every SAE (a parent run's;
    `saeflow evaluate`'s one run has them as eval/*). Returns the MLflow run's URL."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    tr = tracker(cfg)
    url = f"{cfg.tracking.resolved_ui_url(tr.tracking_uri)}/#/experiments/{tr.experiment_id}/runs/{run_id}"
    markdown = results_markdown(cfg, url, results, promotions)
    create_link_artifact(
        url,
        link_text=f"MLflow run {run_id}",
        key="mlflow-run",
        description="The MLflow parent run of this flow run (nested runs per SAE under it)",
    )
    create_markdown_artifact(markdown, key="sae-results", description="Held-out metrics and promotion decisions")
    tr.log_text(run_id, markdown, "eval/results.md")
    tr.set_tags(run_id, {"saeflow.results": "true"})  # what `saeflow show latest` looks for
    if summarize:
        tr.log_metrics(run_id, summary_metrics(results))
    if promotions:
        tr.log_dict(run_id, promotions, "eval/promotions.json")
    run_logger().info("results:\n" + markdown)
    return url
