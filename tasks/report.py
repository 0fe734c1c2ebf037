"""The sweep's frontier report on the parent MLflow run: L0–fidelity plots and the needed-L0 comparison table."""

from __future__ import annotations

import os
from typing import Any

import matplotlib.pyplot as plt
from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.sae.evaluation.frontier import comparison_table, rows_as_dicts, sweep_points, table_csv, table_markdown
from saeflow.sae.evaluation.plots import frontier
from saeflow.tasks.common import run_logger, tracker

FRONTIER_PLOTS = {"fvu": "frontier/l0_vs_fvu.png", "ce_loss_recovered": "frontier/l0_vs_ce_recovered.png"}
"""Fidelity metric → artifact path of its L0 frontier plot on the parent run."""


@task(name="frontier-report", cache_policy=NO_CACHE)
def report_frontier(
    cfg: PipelineConfig, run_id: str, results: dict[str, dict[str, dict[str, float]]]
) -> list[dict[str, Any]]:
    """Log the frontier plots, `frontier/points.json` and `frontier/comparison.{csv,md}` to the parent run."""
    tr = tracker(cfg)
    points = sweep_points(results, {s.label(): s.architecture for s in cfg.saes})
    for metric, path in FRONTIER_PLOTS.items():
        if any(metric in p for p in points):  # CE recovered exists only for models with an LM head
            fig = frontier(points, "l0", metric, f"{cfg.name} · {os.path.basename(cfg.model.name.rstrip('/'))}")
            tr.log_figure(run_id, fig, path)
            plt.close(fig)
    sweep = cfg.sweep
    levels = {"fvu": sweep.fvu_levels, "ce_loss_recovered": sweep.ce_recovered_levels} if sweep else {}
    baseline = sweep.baseline_architecture() if sweep else "relu"
    rows = comparison_table(points, levels, baseline)
    tr.log_dict(run_id, points, "frontier/points.json")
    tr.log_text(run_id, table_csv(rows), "frontier/comparison.csv")
    markdown = table_markdown(rows, baseline)
    tr.log_text(run_id, markdown, "frontier/comparison.md")
    run_logger().info("frontier report:\n" + markdown)
    return rows_as_dicts(rows)
