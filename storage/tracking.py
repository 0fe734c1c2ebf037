"""MLflow: one parent run per pipeline invocation, a nested run per SAE, and the Model Registry.

Uses MlflowClient with explicit run ids (never the thread-local "active run"), so Prefect tasks running in
worker threads log to the right run.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

MAX_PARAM_LEN = 6000


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, default=str) if isinstance(v, list | tuple) else str(v)
    return out


class Tracker:
    """Thin wrapper over MlflowClient for saeflow's run layout."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except MlflowException:  # created concurrently by another process
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id

    # ----- runs --------------------------------------------------------------------------------------------
    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = [Param(k, v[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, prefix: str = "") -> None:
        import time

        ts = int(time.time() * 1000)
        ms = [Metric(prefix + k, float(v), ts, step) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(ms), 500):
            self.client.log_batch(run_id, metrics=ms[i : i + 500])

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step logged for metric `key` in the run, −1 when none."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, local_dir, artifact_path)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)

    def download(self, run_id: str, artifact_path: str, dst: str) -> str:
        return self.client.download_artifacts(run_id, artifact_path, dst)

    def load_logged_sae(self, run_id: str, device="cpu"):
        """The SAE checkpoint logged under `sae/` on a run, loaded as a module (the download is temporary)."""
        from storage.checkpoints import load_sae

        with tempfile.TemporaryDirectory() as tmp:
            return load_sae(self.download(run_id, "sae", tmp), device)

    def artifact_uri(self, run_id: str, path: str) -> str:
        return f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"

    # ----- registry ----------------------------------------------------------------------------------------
    def register(self, name: str, run_id: str, artifact_path: str, tags: dict[str, Any], description: str = "") -> str:
        """New version of registered model `name` pointing at the run's artifacts; returns the version."""
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        mv = self.client.create_model_version(
            name,
            source=self.artifact_uri(run_id, artifact_path),
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            description=description,
        )
        return str(mv.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


def registered_model_name(prefix: str, model: str, site: str, architecture: str) -> str:
    """One registered model per model/site/architecture; MLflow names may not contain '/', '@' or ':'."""
    base = model.removeprefix("pypi:")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(base.rstrip("/")) or base).strip("-")
    return f"{prefix}{slug}.{site}.{architecture}"


_REF_RE = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+|latest))?$")


def model_uri(ref: str) -> str:
    """`name@alias`, `name/3`, `name/latest` or `name` (latest version) → a `models:/` URI."""
    m = _REF_RE.match(ref)
    if not m:
        raise ValueError(f"bad registered model reference {ref!r}: use NAME, NAME@ALIAS or NAME/VERSION")
    if m["alias"]:
        return f"models:/{m['name']}@{m['alias']}"
    return f"models:/{m['name']}/{m['version'] or 'latest'}"


def pull(ref: str, dst: str, tracking_uri: str) -> str:
    """Download registered SAE `ref` into `dst`; returns the checkpoint directory."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    os.makedirs(dst, exist_ok=True)
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=model_uri(ref), dst_path=dst)
    except MlflowException as e:
        raise ValueError(f"cannot pull {ref!r} from {tracking_uri}: {e.message.splitlines()[0]}") from e


def open_sae_runs(
    tr: Tracker, site: str, specs: list, parent_run_id: str, params: dict[str, Any],
    ckpt,
) -> list[str]:
    """One nested MLflow run per SAE. A resumed group continues the runs its checkpoint names, moved under the
    current parent run; if those are gone it starts new ones and replays the checkpoint's metric history."""
    if ckpt is not None:
        runs = ckpt.extra.get("runs", [])
        try:
            alive = len(runs) == len(specs) and all(
                tr.client.get_run(r).info.lifecycle_stage == "active" for r in runs)
        except MlflowException:
            alive = False
        if alive:
            for run_id in runs:
                tr.client.update_run(run_id, status="RUNNING")
                tr.set_tags(run_id, {"mlflow.parentRunId": parent_run_id, "resumed_at_tokens": ckpt.tokens_seen})
            return runs
    runs = []
    for spec in specs:
        tags = {"site": site, "architecture": spec.architecture}
        run_id = tr.start_run(f"{site}/{spec.label()}", parent_run_id, tags)
        tr.log_params(run_id, {"sae": spec.model_dump(), **params})
        runs.append(run_id)
    for run_id, hist in zip(runs, ckpt.extra["history"] if ckpt else []):
        for m in hist:
            tr.log_metrics(run_id, {k: v for k, v in m.items() if k != "tokens"}, step=m["tokens"], prefix="train/")
    return runs


def publish_sae(
    tr: Tracker, run_id: str, sae, metadata: dict[str, Any], name: str, tags: dict[str, Any],
    alias: str | None, curves=None, description: str = "",
) -> str:
    """Log the SAE checkpoint (and its training-curves figure) on its run, register it as a new version of `name`,
    point `alias` at it, and tag the run with the version. Returns the version."""
    from storage.checkpoints import save_sae

    with tempfile.TemporaryDirectory() as tmp:
        save_sae(sae, os.path.join(tmp, "sae"), metadata)
        tr.log_artifacts(run_id, os.path.join(tmp, "sae"), "sae")
    if curves is not None:
        tr.client.log_figure(run_id, curves, "plots/training_curves.png")
    version = tr.register(name, run_id, "sae", tags, description=description)
    if alias:
        tr.set_alias(name, alias, version)
    tr.set_tags(run_id, {"registered_model": name, "registered_version": version})
    return version


def log_evaluation(
    tr: Tracker, run_id: str, site: str, label: str, sae, ev, tokens,
    report: str | None = None, extra: dict[str, Any] | None = None,
) -> None:
    """Metrics (`eval/...`), eval/metrics.json, eval/firing_frequency.npy, plots/*.png and reports/latents.html."""
    import matplotlib.pyplot as plt
    import numpy as np

    from sae.afa import decoder_cosines
    from sae.evaluation import POSITIONS_NOTE
    from sae.plots import decoder_cosine_histogram, feature_density, zf_plot

    m = ev.metrics
    tr.log_metrics(run_id, m, prefix="eval/")
    hist = ev.l0_histogram.tolist()
    while len(hist) > 1 and hist[-1] == 0:
        hist.pop()
    tr.log_dict(run_id, {"site": site, "metrics": m, "positions": POSITIONS_NOTE, "eval_windows": tokens.n_eval,
                         "context_size": tokens.context_size, "l0_histogram": [int(c) for c in hist],
                         **(extra or {})}, "eval/metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "firing_frequency.npy")
        np.save(path, ev.firing_frequency.numpy())
        tr.log_artifact(run_id, path, "eval")
    title = f"{site} · {label}"
    figs = {"plots/feature_density.png": feature_density(ev.firing_frequency.numpy(), title),
            "plots/decoder_cosines.png": decoder_cosine_histogram(decoder_cosines(sae.W_dec).numpy(), title)}
    if ev.afa is not None:
        z, f = ev.afa.points()
        figs["plots/zf.png"] = zf_plot(z.numpy(), f.numpy(), title)
    for name, fig in figs.items():
        tr.client.log_figure(run_id, fig, name)
        plt.close(fig)
    if report is not None:
        tr.client.log_text(run_id, report, "reports/latents.html")
