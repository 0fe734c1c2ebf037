"""Sparsity–fidelity frontiers of a sweep (seed 1, Figure 1) and the L0 each architecture needs for a fidelity level.

A sweep point is one evaluated SAE: `{"site", "architecture", "label", "l0", "fvu", "ce_loss_recovered", ...}`.
An architecture's frontier at a site is its Pareto-optimal points (no other point has L0 ≤ and fidelity ≥ with
one of them strict), sorted by L0, so fidelity strictly improves along it. The L0 needed for a level is read off
the frontier by interpolating log L0 linearly in the metric between the two points that bracket the level.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from typing import Any

HIGHER_IS_BETTER = {
    "fvu": False,
    "mse": False,
    "kl_div": False,
    "ce_loss_recovered": True,
    "ce_loss_recovered_mean": True,
    "explained_variance": True,
}
"""Direction of each fidelity metric a frontier can be drawn for."""


def higher_is_better(metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"no frontier direction for metric {metric!r}; choose one of {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


def sweep_points(results: dict[str, dict[str, dict[str, float]]], architectures: dict[str, str]) -> list[dict]:
    """Flatten `{site: {label: metrics}}` (what evaluation returns) into sweep points; `architectures` maps
    label → architecture."""
    return [
        {"site": site, "label": label, "architecture": architectures[label], **metrics}
        for site, per_sae in results.items()
        for label, metrics in per_sae.items()
    ]


def pareto_frontier(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """Pareto-optimal (L0, metric) pairs sorted by L0: lower L0 is better, and the metric in its direction.

    Walking points by increasing L0 (ties: best metric first), a point is kept only when it strictly beats every
    point kept so far. NaN metrics and L0 = 0 (an SAE that never fires: no place on a log-L0 axis) are dropped.
    """
    sign = 1.0 if higher_better else -1.0
    ordered = sorted((p for p in points if p[0] > 0 and not math.isnan(p[1])), key=lambda p: (p[0], -sign * p[1]))
    out: list[tuple[float, float]] = []
    for l0, m in ordered:
        if not out or sign * m > sign * out[-1][1]:
            out.append((l0, m))
    return out


@dataclass(frozen=True)
class NeededL0:
    """The L0 an architecture's frontier needs to reach a fidelity level."""

    l0: float | None
    """Interpolated L0; None when no frontier point reaches the level."""
    how: str
    """`interpolated` (between two bracketing points), `at_most` (its lowest-L0 point already reaches it, so the
    true value is ≤ l0) or `not_reached`."""


def l0_needed(frontier: list[tuple[float, float]], level: float, higher_better: bool) -> NeededL0:
    """Smallest L0 at which `frontier` (from `pareto_frontier`) reaches `level`: log L0 interpolated linearly in
    the metric between the last point short of the level and the first point reaching it."""
    sign = 1.0 if higher_better else -1.0
    for i, (l0, m) in enumerate(frontier):
        if sign * m >= sign * level:
            if i == 0:
                return NeededL0(l0, "at_most")
            l0_a, m_a = frontier[i - 1]
            t = (level - m_a) / (m - m_a)
            return NeededL0(math.exp(math.log(l0_a) + t * (math.log(l0) - math.log(l0_a))), "interpolated")
    return NeededL0(None, "not_reached")


@dataclass(frozen=True)
class ComparisonRow:
    """One cell of the comparison table: site × architecture × fidelity level."""

    site: str
    architecture: str
    metric: str
    level: float
    l0_needed: float | None
    how: str
    ratio_to_baseline: float | None
    """l0_needed / the baseline architecture's at the same site and level; None when either is missing."""


def comparison_table(points: list[dict], levels: dict[str, list[float]], baseline: str = "relu") -> list[ComparisonRow]:
    """L0 needed per site × architecture × (metric, level), and its ratio to `baseline`'s. Metrics no point
    carries (CE recovered without an LM head) are left out."""
    rows: list[ComparisonRow] = []
    for site in sorted({p["site"] for p in points}):
        archs = sorted({p["architecture"] for p in points if p["site"] == site})
        for metric, metric_levels in levels.items():
            hb = higher_is_better(metric)
            fronts = {
                a: pareto_frontier(
                    [
                        (p["l0"], p[metric])
                        for p in points
                        if p["site"] == site and p["architecture"] == a and metric in p
                    ],
                    hb,
                )
                for a in archs
            }
            if not any(fronts.values()):
                continue
            for level in metric_levels:
                needed = {a: l0_needed(fronts[a], level, hb) for a in archs}
                base = needed.get(baseline)
                for a in archs:
                    n = needed[a]
                    ratio = n.l0 / base.l0 if n.l0 is not None and base is not None and base.l0 else None
                    rows.append(ComparisonRow(site, a, metric, level, n.l0, n.how, ratio))
    return rows


def table_csv(rows: list[ComparisonRow]) -> str:
    """Long format: one line per site × architecture × level; empty cells where a value is missing."""
    buf = io.StringIO()
    fields = list(ComparisonRow.__dataclass_fields__)
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def _level_header(metric: str, level: float) -> str:
    return f"{metric} {'≥' if higher_is_better(metric) else '≤'} {level:g}"


def _cell(r: ComparisonRow, baseline: str) -> str:
    if r.l0_needed is None:
        return "n/a"
    text = f"{'≤ ' if r.how == 'at_most' else ''}{r.l0_needed:.1f}"
    if r.ratio_to_baseline is not None and r.architecture != baseline:
        text += f" (×{r.ratio_to_baseline:.2f})"
    return text


def table_markdown(rows: list[ComparisonRow], baseline: str = "relu") -> str:
    """Per site, one row per architecture and one column per level: the L0 needed and, in brackets, its ratio to
    the baseline's. `≤` marks an upper bound, n/a a level the architecture never reached."""
    legend = (
        f"L0 needed to reach each fidelity level (log-L0 interpolation along each architecture's Pareto "
        f"frontier); (×r) = ratio to {baseline}; ≤ = reached already at the lowest L0 swept; "
        "n/a = not reached."
    )
    out = [legend, ""]
    for site in sorted({r.site for r in rows}):
        cols = list(dict.fromkeys((r.metric, r.level) for r in rows if r.site == site))
        archs = list(dict.fromkeys(r.architecture for r in rows if r.site == site))
        cell = {(r.architecture, r.metric, r.level): r for r in rows if r.site == site}
        out += [
            f"### {site}",
            "",
            "| architecture | " + " | ".join(_level_header(*c) for c in cols) + " |",
            "| --- |" + " ---: |" * len(cols),
        ]
        for a in archs:
            out.append(f"| {a} | " + " | ".join(_cell(cell[(a, *c)], baseline) for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def rows_as_dicts(rows: list[ComparisonRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
