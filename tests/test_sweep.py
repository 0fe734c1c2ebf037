"""Sweeps: grid expansion, Pareto frontiers, needed-L0 interpolation, and `saeflow sweep` on the tiny GPT-2 logging
frontier plots and the comparison table to the parent MLflow run."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import matplotlib.pyplot as plt
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from saeflow.cli import app
from saeflow.config import ConfigError, validate_config
from saeflow.sae.evaluation.frontier import comparison_table, l0_needed, pareto_frontier, table_markdown
from saeflow.sae.evaluation.plots import frontier
from tests.conftest import tiny_config

# ----- grid expansion ---------------------------------------------------------------------------------------------


def test_sweep_expands_to_one_named_spec_per_grid_point():
    cfg = validate_config(
        {
            "sweep": {
                "expansion_factor": 4,
                "lr": 2e-3,
                "architectures": {
                    "topk": {"k": [8, 16, 32]},
                    "relu": {"l1_coefficient": [1, 3], "lr": [1e-3, 2e-3]},
                    "topafa": None,
                },
            }
        }
    )
    labels = [s.label() for s in cfg.saes]
    assert labels == [
        "topk-x4-k8",
        "topk-x4-k16",
        "topk-x4-k32",
        "relu-x4-l1_1-lr_0.001",
        "relu-x4-l1_1-lr_0.002",
        "relu-x4-l1_3-lr_0.001",
        "relu-x4-l1_3-lr_0.002",
        "topafa-x4-afa0.03125",
    ]
    assert all(s.expansion_factor == 4 for s in cfg.saes)
    assert [s.lr for s in cfg.saes[:3]] == [2e-3] * 3  # the shared lr, unless the entry sets its own
    assert cfg.sweep.baseline_architecture() == "relu"


def test_one_list_of_l0_targets_sweeps_every_architecture_by_its_own_knob():
    cfg = validate_config(
        {"sweep": {"l0_targets": [16, 32.0], "architectures": {"topk": None, "gated": None, "matryoshka": {"k": 8}}}}
    )
    assert [s.label() for s in cfg.saes] == [
        "topk-x8-k16",
        "topk-x8-k32",
        "gated-x8-L0_16",
        "gated-x8-L0_32",
        "matryoshka-x8-k8",
    ]
    assert [s.target_l0 for s in cfg.saes[2:4]] == [16, 32]


def test_a_list_valued_field_given_as_one_list_is_fixed_not_swept():
    cfg = validate_config({"sweep": {"architectures": {"matryoshka": {"prefix_fractions": [0.5, 1.0], "k": [8, 16]}}}})
    assert [s.prefix_fractions for s in cfg.saes] == [[0.5, 1.0], [0.5, 1.0]]


def test_a_sweep_config_survives_a_dump_and_reload():
    cfg = validate_config({"sweep": {"architectures": {"topk": {"k": [8, 16]}}}})
    again = validate_config(cfg.model_dump(mode="json"))
    assert [s.label() for s in again.saes] == ["topk-x8-k8", "topk-x8-k16"]


@pytest.mark.parametrize(
    "sweep, fragment",
    [
        ({"architectures": {"resnet": {}}}, "unknown architecture 'resnet'"),
        ({"architectures": {"topk": {"k": [0, 8]}}}, "architectures.topk.k"),
        ({"architectures": {"topk": {"k": []}}}, "give at least one value"),
        ({"architectures": {"topk": {}}, "baseline": "relu"}, "baseline 'relu'"),
    ],
)
def test_bad_sweeps_fail_with_one_line(sweep, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        validate_config({"sweep": sweep})


def test_sweep_and_a_different_saes_list_conflict():
    with pytest.raises(ConfigError, match="either `saes` or `sweep`"):
        validate_config({"sweep": {"architectures": {"topk": {}}}, "saes": [{"architecture": "relu"}]})


# ----- Pareto frontier and interpolation (hand-computed) --------------------------------------------------------


def test_pareto_frontier_drops_dominated_points_and_sorts_by_l0():
    pts = [(20, 0.3), (10, 0.5), (15, 0.6), (40, 0.2), (40, 0.1), (50, 0.1)]
    # (15, 0.6) is beaten by (10, 0.5); (40, 0.2) by (40, 0.1); (50, 0.1) by (40, 0.1).
    assert pareto_frontier(pts, higher_better=False) == [(10, 0.5), (20, 0.3), (40, 0.1)]


def test_pareto_frontier_for_a_higher_is_better_metric():
    pts = [(8, 0.7), (16, 0.6), (32, 0.9), (64, 0.95), (4, float("nan")), (0, 0.0)]  # NaN and L0 = 0 dropped
    assert pareto_frontier(pts, higher_better=True) == [(8, 0.7), (32, 0.9), (64, 0.95)]


def test_needed_l0_interpolates_log_l0_between_bracketing_points():
    front = [(10, 0.5), (20, 0.3), (40, 0.1)]
    n = l0_needed(front, 0.2, higher_better=False)  # halfway from (20, 0.3) to (40, 0.1): 20 · 2^0.5
    assert n.how == "interpolated" and n.l0 == pytest.approx(20 * math.sqrt(2))
    assert l0_needed(front, 0.4, False).l0 == pytest.approx(10 * math.sqrt(2))
    assert l0_needed(front, 0.1, False).l0 == pytest.approx(40)  # exactly on a point
    ce = l0_needed([(8, 0.7), (32, 0.9)], 0.85, higher_better=True)  # t = 0.75: 8 · 4^0.75
    assert ce.l0 == pytest.approx(8 * 4**0.75)


def test_needed_l0_marks_bounds_and_unreached_levels():
    front = [(10, 0.5), (20, 0.3)]
    assert l0_needed(front, 0.6, False).how == "at_most" and l0_needed(front, 0.6, False).l0 == 10
    assert l0_needed(front, 0.1, False).how == "not_reached" and l0_needed(front, 0.1, False).l0 is None
    assert l0_needed([], 0.1, False).how == "not_reached"


def test_comparison_table_gives_ratio_to_the_baseline():
    pts = [
        {"site": "s", "architecture": a, "l0": l0, "fvu": f}
        for a, l0, f in (("relu", 10.0, 0.5), ("relu", 40.0, 0.1), ("gated", 5.0, 0.5), ("gated", 20.0, 0.1))
    ]
    rows = {(r.architecture, r.level): r for r in comparison_table(pts, {"fvu": [0.3, 0.05]}, "relu")}
    assert rows[("relu", 0.3)].l0_needed == pytest.approx(20) and rows[("gated", 0.3)].l0_needed == pytest.approx(10)
    assert rows[("gated", 0.3)].ratio_to_baseline == pytest.approx(0.5)
    assert rows[("gated", 0.05)].l0_needed is None and rows[("gated", 0.05)].ratio_to_baseline is None
    md = table_markdown(list(rows.values()), "relu")
    assert "| gated | 10.0 (×0.50) | n/a |" in md and "fvu ≤ 0.3" in md


def test_comparison_table_skips_metrics_no_point_has():
    pts = [{"site": "s", "architecture": "topk", "l0": 8.0, "fvu": 0.4}]
    assert {r.metric for r in comparison_table(pts, {"fvu": [0.3], "ce_loss_recovered": [0.9]})} == {"fvu"}


def test_frontier_plot_draws_one_line_per_architecture_per_site():
    pts = [
        {"site": site, "architecture": a, "l0": l0, "fvu": f}
        for site in ("a", "b")
        for a, l0, f in (("relu", 10, 0.5), ("relu", 20, 0.6), ("relu", 40, 0.1), ("topk", 8, 0.4), ("topk", 16, 0.2))
    ]
    fig = frontier(pts, "l0", "fvu", "t")
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == 2 and ax.get_xscale() == "log"
        assert sorted(len(ln.get_xdata()) for ln in lines) == [2, 2]  # relu's dominated (20, 0.6) is a marker only
    plt.close(fig)


# ----- the sweep flow on the tiny GPT-2 through the CLI ---------------------------------------------------------

FVU_LEVELS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
CE_LEVELS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


@pytest.fixture(scope="module")
def sweep_run(prefect_server, tiny_gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(
        str(root / "work"),
        tiny_gpt2_dir,
        extract={"sites": ["resid_post.1"]},
        tokens={"train_tokens": 4096, "eval_tokens": 256},
        train={"batch_size": 256, "log_every": 4},
    )
    data = cfg.model_dump(mode="json", exclude={"saes"})
    data["sweep"] = {
        "expansion_factor": 4,
        "lr": 3e-3,
        "fvu_levels": FVU_LEVELS,
        "ce_recovered_levels": CE_LEVELS,
        "architectures": {"topk": {"k": [4, 16]}, "relu": {"l1_coefficient": [0.3, 3.0]}},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"MLflow parent run: (\w+)", result.output).group(1)
    return validate_config(data), run_id, result.output


def _artifact(client: MlflowClient, run_id: str, path: str) -> bytes:
    with open(client.download_artifacts(run_id, path), "rb") as f:
        return f.read()


def _independent_l0(points: list[tuple[float, float]], level: float, higher: bool) -> float | None:
    """Brute-force Pareto set + bracketing interpolation, written apart from saeflow.sae.evaluation.frontier."""
    s = 1 if higher else -1
    points = [p for p in points if p[0] > 0 and p[1] == p[1]]
    front = sorted(p for p in points if not any(q != p and q[0] <= p[0] and s * q[1] >= s * p[1] for q in points))
    for i, (l0, m) in enumerate(front):
        if s * m >= s * level:
            if i == 0:
                return l0
            l0_a, m_a = front[i - 1]
            return l0_a * (l0 / l0_a) ** ((level - m_a) / (m - m_a))
    return None


def test_sweep_trains_and_evaluates_every_grid_point(sweep_run):
    cfg, run_id, _ = sweep_run
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    children = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(f"resid_post.1/{s.label()}" for s in cfg.saes)
    assert len(children) == 4 and all("eval/ce_loss_recovered" in c.data.metrics for c in children)
    for c in children:  # every swept SAE also gets its latent report
        page = open(client.download_artifacts(c.info.run_id, "reports/latents.html")).read()
        assert "<span class='hit'>" in page and "latent " in page


def test_sweep_logs_two_real_frontier_pngs(sweep_run):
    cfg, run_id, _ = sweep_run
    client = MlflowClient(cfg.tracking_uri)
    points = json.loads(_artifact(client, run_id, "frontier/points.json"))
    assert len(points) == 4
    for metric, path in (("fvu", "frontier/l0_vs_fvu.png"), ("ce_loss_recovered", "frontier/l0_vs_ce_recovered.png")):
        png = _artifact(client, run_id, path)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        fig = frontier(points, "l0", metric, "check")
        assert len(fig.axes) == len(cfg.extract.sites)
        for ax in fig.axes:
            assert len(ax.get_lines()) == 2  # topk and relu
            assert all(len(ln.get_xdata()) >= 1 for ln in ax.get_lines())
        plt.close(fig)


def test_comparison_table_matches_an_independent_interpolation(sweep_run):
    cfg, run_id, output = sweep_run
    client = MlflowClient(cfg.tracking_uri)
    points = json.loads(_artifact(client, run_id, "frontier/points.json"))
    rows = list(csv.DictReader(io.StringIO(_artifact(client, run_id, "frontier/comparison.csv").decode())))
    assert len(rows) == 2 * (len(FVU_LEVELS) + len(CE_LEVELS))
    assert any(r["how"] == "interpolated" for r in rows)  # the levels straddle the measured points
    needed = {}
    for r in rows:
        higher = r["metric"] == "ce_loss_recovered"
        pts = [(p["l0"], p[r["metric"]]) for p in points if p["architecture"] == r["architecture"]]
        want = _independent_l0(pts, float(r["level"]), higher)
        needed[(r["architecture"], r["metric"], r["level"])] = want
        if want is None:
            assert r["l0_needed"] == "" and r["how"] == "not_reached"
        else:
            assert float(r["l0_needed"]) == pytest.approx(want, rel=1e-9)
    for r in rows:
        base = needed[("relu", r["metric"], r["level"])]
        mine = needed[(r["architecture"], r["metric"], r["level"])]
        if base is None or mine is None:
            assert r["ratio_to_baseline"] == ""
        else:
            assert float(r["ratio_to_baseline"]) == pytest.approx(mine / base, rel=1e-9)
    md = _artifact(client, run_id, "frontier/comparison.md").decode()
    assert "### resid_post.1" in md and "| topk |" in md and "| relu |" in md
    assert "resid_post.1  topk" in output  # the CLI prints the table too


def test_sweep_command_refuses_a_config_without_a_sweep(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"name": "plain"}))
    res = CliRunner().invoke(app, ["sweep", str(p)])
    assert res.exit_code == 2 and "no `sweep:` section" in res.stderr
