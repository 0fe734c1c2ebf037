"""The MLflow Model Registry side of saeflow: champion / challenger aliases, promotion records, listings.

Every new version becomes `challenger`; the promotion gate (tasks/promote.py) moves `champion` to it or leaves
`champion` where it is, and writes the decision and both sides' numbers on the version (tags `promotion.*` and the
description). `saeflow promote` moves an alias by hand and records who did it.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import getpass
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from saeflow.sae.evaluation.promotion import PromotionDecision
from saeflow.storage.tracking import Tracker

CHAMPION = "champion"
CHALLENGER = "challenger"
EVAL_HASH_TAG = "eval_tokens_hash"
"""Version tag: hash of the held-out windows the version's metric tags were measured on."""
METRIC_TAGS = ("l0", "fvu", "ce_loss_recovered", "kl_div", "dead_fraction", "pooled_cos_recovered")


class RegistryError(ValueError):
    """A registry request that cannot be met; str() is one line naming the fix."""


def version_by_alias(tr: Tracker, name: str, alias: str) -> ModelVersion | None:
    try:
        return tr.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def tag_version(tr: Tracker, name: str, version: str, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        tr.client.set_model_version_tag(name, version, k, str(v))


def tag_metrics(tr: Tracker, name: str, version: str, metrics: dict[str, float], eval_hash: str) -> None:
    """The version's held-out metrics as tags, with the hash of the tokens they were measured on."""
    tags = {k: f"{metrics[k]:.6g}" for k in METRIC_TAGS if k in metrics}
    tag_version(tr, name, version, {**tags, EVAL_HASH_TAG: eval_hash})


def version_metrics(mv: ModelVersion) -> dict[str, float]:
    return {k: float(mv.tags[k]) for k in METRIC_TAGS if k in mv.tags}


def record_decision(tr: Tracker, name: str, version: str, decision: PromotionDecision, rescored: bool) -> None:
    """Write the gate's decision on the challenger (tags + description) and move `champion` if it won."""
    tags = decision.tags()
    if rescored:
        tags["promotion.champion_rescored"] = "true"  # the champion's own tags were measured on other tokens
    tag_version(tr, name, version, tags)
    mv = tr.client.get_model_version(name, version)
    verdict = "Promoted to champion" if decision.promoted else "Not promoted"
    note = f"{verdict}: {decision.reason}."
    if decision.champion_version is not None:
        note += (
            f" Challenger {decision.metric} {decision.challenger_value:.4g} at L0 {decision.challenger_l0:.4g};"
            f" champion v{decision.champion_version} {decision.champion_value:.4g} at L0 "
            f"{decision.champion_l0:.4g}{' (re-scored on the same tokens)' if rescored else ''}."
        )
    tr.client.update_model_version(name, version, description=f"{mv.description or ''}\n\n{note}".strip())
    if decision.promoted:
        tr.set_alias(name, CHAMPION, version)


@contextlib.contextmanager
def open_registry(tracking_uri: str) -> Iterator[Tracker]:
    """A registry-only tracker (no experiment, no runs). A missing local SQLite store or an unreachable server is a
    RegistryError with one line, and nothing is created."""
    if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri.removeprefix("sqlite:///")):
        raise RegistryError(
            f"no MLflow store at {tracking_uri}: run `saeflow run` first, or pass --tracking-uri / set "
            "MLFLOW_TRACKING_URI"
        )
    # A down server answers in seconds, not minutes: one retry, for the registry call only (MLflow reads the
    # variable per request; leaving it set would cut every later client's retries in this process to one).
    key, before = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ.setdefault(key, "1")
    try:
        yield Tracker(tracking_uri, None)
    except MlflowException as e:
        raise RegistryError(f"MLflow at {tracking_uri}: {e.message.splitlines()[0][:300]}") from None
    finally:
        if before is None:
            os.environ.pop(key, None)


def promote_manually(tr: Tracker, name: str, version: str, alias: str = CHAMPION) -> str | None:
    """Point `alias` at `version` by hand; records who, when and what it replaced. Returns the replaced version."""
    try:
        tr.client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(
            f"registered model {name!r} has no version {version!r}: `saeflow models` lists them"
        ) from None
    before = version_by_alias(tr, name, alias)
    who = getpass.getuser()
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    tag_version(
        tr,
        name,
        version,
        {
            "promotion.decision": "manual",
            f"promotion.manual.{alias}": f"{who} at {when}",
            "promotion.replaced_version": before.version if before else "none",
        },
    )
    mv = tr.client.get_model_version(name, version)
    replaced = f" (replacing v{before.version})" if before else ""
    tr.client.update_model_version(
        name,
        version,
        description=(f"{mv.description or ''}\n\nManually made {alias} by {who} at {when}{replaced}.").strip(),
    )
    tr.set_alias(name, alias, version)
    return before.version if before else None


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: str
    aliases: tuple[str, ...]
    metrics: dict[str, float]
    decision: str


def list_versions(tr: Tracker, pattern: str = "*") -> list[VersionRow]:
    """Every version of every registered model whose name matches the glob `pattern`, newest first per model."""
    rows = []
    for rm in tr.client.search_registered_models(max_results=1000):
        if not fnmatch.fnmatchcase(rm.name, pattern):
            continue
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = tr.client.search_model_versions(f"name = '{rm.name}'", max_results=1000)
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            rows.append(
                VersionRow(
                    rm.name,
                    str(mv.version),
                    tuple(sorted(aliases.get(str(mv.version), []))),
                    version_metrics(mv),
                    mv.tags.get("promotion.decision", ""),
                )
            )
    return sorted(rows, key=lambda r: (r.name, -int(r.version)))


def read_results_table(tr: Tracker, run_id: str = "latest") -> str:
    """The results table (markdown, `eval/results.md`) a pipeline or sweep run logged on its parent run; `latest`
    is the newest run tagged as having one."""
    import tempfile

    if run_id == "latest":
        experiments = [e.experiment_id for e in tr.client.search_experiments()]
        newest = tr.client.search_runs(
            experiments, "tags.saeflow.results = 'true'", order_by=["attributes.start_time DESC"], max_results=1
        )
        if not newest:
            raise RegistryError(f"no run at {tr.tracking_uri} has a results table yet: `saeflow run` makes one")
        run_id = newest[0].info.run_id
    try:
        run = tr.client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"no MLflow run {run_id!r} at {tr.tracking_uri}: `saeflow run` prints its run id") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tr.download(run_id, "eval/results.md", tmp)
        except (MlflowException, OSError):
            raise RegistryError(
                f"run {run_id} ({run.info.run_name}, {run.info.status}) has no results table: it is not a pipeline "
                "or sweep parent run, or it did not finish (its SAE runs are nested under it)"
            ) from None
        with open(path, encoding="utf-8") as f:
            return f.read()
