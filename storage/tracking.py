"""MLflow: one parent run per pipeline invocation, a nested run per SAE, and the Model Registry.

Uses MlflowClient with explicit run ids (never the thread-local "active run"), so Prefect tasks running in
worker threads log to the right run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, cast

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from saeflow.storage.interrupts import WholeCalls
from saeflow.storage.locks import free_reserve

MAX_PARAM_LEN = 6000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_TRAINING = "custom_model_development"
"""MLflow 3 opens experiments of this kind in its training view (runs, metrics, models), not its GenAI overview."""
OWNER_TAG = "saeflow.root"
"""Run tag: the root (absolute path) of the saeflow run that created the run."""
MODEL_URI_TAG = "saeflow.model_uri"
"""Run tag naming the run's logged SAE model (`models:/m-…`)."""
SAE_MODEL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow_sae_model.py")


@contextlib.contextmanager
def sae_library_code():
    """A temporary `saeflow/` holding only the pure-torch `saeflow.sae` library: the code an MLflow SAE model ships
    (MLflow puts its parent on sys.path at load time, so the model imports `saeflow.sae` like saeflow does)."""
    import shutil

    import saeflow.sae

    with tempfile.TemporaryDirectory(prefix="saeflow-code-") as tmp:
        package = os.path.join(tmp, "saeflow")
        shutil.copytree(
            saeflow.sae.__path__[0], os.path.join(package, "sae"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        with open(os.path.join(package, "__init__.py"), "w") as f:
            f.write('"""saeflow\'s SAE library, as shipped inside an MLflow model."""\n')
        yield package


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, default=str) if isinstance(v, list | tuple) else str(v)
    return out


@contextlib.contextmanager
def process_uris(uri: str):
    """Point MLflow's process-wide tracking and registry URIs at `uri` for a call that reads them (model logging,
    `models:/` downloads), then put back what was there, environment included: `mlflow.set_tracking_uri` also sets
    $MLFLOW_TRACKING_URI, which would otherwise decide every later config's default tracking URI."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


BROKEN_CONNECTION = ("Connection broken", "Connection aborted", "RemoteDisconnected", "IncompleteRead")
"""What MLflow's error says when the server went away in the middle of a request."""


class Tracker:
    """Thin wrapper over MlflowClient for saeflow's run layout."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str | None,
        artifact_location: str | None = None,
        owner: str | None = None,
    ):
        """`experiment` None: registry work only (listing, promoting); no experiment is looked up or created.
        `owner`: the root the runs belong to, tagged on every run (`saeflow.root`) so a later run holding that root
        can tell the runs a killed process left RUNNING (`end_orphaned_runs`)."""
        self.tracking_uri = tracking_uri
        self.owner = owner
        # every client call is whole: an interrupt waits for it (storage/interrupts.py)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.client = cast(MlflowClient, WholeCalls(client))
        self.experiment_id: str | None = None
        if experiment is None:
            return
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except MlflowException:  # created concurrently by another process
                raced = self.client.get_experiment_by_name(experiment)
                if raced is None:
                    raise
                self.experiment_id = raced.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != CLASSIC_TRAINING:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_TRAINING)

    def run_experiment(self) -> str:
        """The experiment runs go to; a registry-only tracker (made with experiment=None) has none."""
        if self.experiment_id is None:
            raise RuntimeError("this Tracker was made for the registry only (experiment=None): it cannot log runs")
        return self.experiment_id

    # ----- runs --------------------------------------------------------------------------------------------
    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if self.owner:
            tags[OWNER_TAG] = self.owner
        return self.client.create_run(self.run_experiment(), run_name=name, tags=tags).info.run_id

    def end_orphaned_runs(self, status: str = "KILLED") -> list[str]:
        """Mark `status` the runs of this owner still RUNNING. Call it only while holding the owner's root lock: then
        no other live process can be writing them, so they are what a killed run (KILLED) or this failing run
        (FAILED) left open. Returns their ids."""
        if not self.owner:
            return []
        owner = self.owner.replace("'", "\\'")
        runs = self.client.search_runs(
            [self.run_experiment()], f"attributes.status = 'RUNNING' and tags.`{OWNER_TAG}` = '{owner}'"
        )
        for run in runs:
            self.client.set_terminated(run.info.run_id, status)
        return [r.info.run_id for r in runs]

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status != "FINISHED" and self.owner:
            free_reserve(self.owner)  # a run failing on a full disk still gets room to be marked (storage/locks.py)
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = [Param(k, v[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, prefix: str = "") -> None:
        """A server that dies while answering (the request may or may not have landed) is retried with the same
        timestamp, for about half a minute: MLflow's client retries only requests that never reached it, and an
        identical metric logged twice is stored once."""
        import time

        ts = int(time.time() * 1000)
        ms = [Metric(prefix + k, float(v), ts, step) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(ms), 500):
            for wait in (1, 2, 4, 8, 16, None):
                try:
                    self.client.log_batch(run_id, metrics=ms[i : i + 500])
                    break
                except MlflowException as e:
                    if wait is None or not any(w in str(e) for w in BROKEN_CONNECTION):
                        raise
                    time.sleep(wait)

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step logged for metric `key` in the run, −1 when none."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure (as drawn by saeflow.sae.evaluation.plots) as the run artifact `artifact_file`."""
        self.client.log_figure(run_id, figure, artifact_file)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, local_dir, artifact_path)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)

    def download(self, run_id: str, artifact_path: str, dst: str) -> str:
        return self.client.download_artifacts(run_id, artifact_path, dst)

    def load_logged_sae(self, run_id: str, device="cpu"):
        """The SAE logged on a run (its MLflow model, or a raw `sae/` checkpoint), loaded as a module."""
        import mlflow

        from saeflow.storage.checkpoints import load_sae

        model_uri = self.client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
        with tempfile.TemporaryDirectory() as tmp:
            if model_uri is None:
                return load_sae(self.download(run_id, "sae", tmp), device)
            with process_uris(self.tracking_uri):
                return load_sae(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp), device)

    def log_sae_model(
        self, run_id: str, checkpoint: str, d_in: int, d_sae: int, tags: dict[str, str] | None = None
    ) -> tuple[str, str]:
        """Log the checkpoint directory as the run's MLflow pyfunc model (models from code, weights as safetensors,
        the `sae` library as its code); returns (model URI, model id)."""
        import mlflow.pyfunc
        import numpy as np
        import torch
        from mlflow.models import Model, ModelSignature
        from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

        signature = ModelSignature(  # unnamed tensors: predict takes and returns plain arrays
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, d_in))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, d_sae))]),
            params=ParamSchema([ParamSpec("output", "string", "codes")]),
        )
        # Created here, in the run's experiment: Model.log would put it in the process's active experiment.
        logged = self.client.create_logged_model(
            self.run_experiment(), name="sae_model", source_run_id=run_id, model_type="sparse-autoencoder", tags=tags
        )
        with process_uris(self.tracking_uri), sae_library_code() as code, warnings.catch_warnings():
            # The signature above is explicit, so MLflow's advice to give an input example to infer one from does
            # not apply (printed, two lines of noise per registered SAE).
            warnings.filterwarnings("ignore", ".*input example was not provided", UserWarning)
            info = Model.log(
                artifact_path=None,
                name="sae_model",
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=SAE_MODEL_CODE,
                artifacts={"sae": checkpoint},
                code_paths=[code],
                signature=signature,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    "safetensors",
                    "pydantic>=2",
                    "numpy",
                    "mlflow",
                ],
                metadata={"saeflow_checkpoint": "artifacts/sae"},
            )
        self.set_tags(run_id, {MODEL_URI_TAG: info.model_uri})
        return info.model_uri, info.model_id

    def log_dataset(
        self, run_id: str, name: str, uri: str, digest: str, profile: dict[str, Any], context: str = "train"
    ) -> None:
        """Record a store on the run as an MLflow dataset input (Datasets column, run page): name, digest, source."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = json.dumps({"uri": uri if "://" in uri else "file://" + uri})
        entity = Dataset(name, digest[:36], "http", source, profile=json.dumps(profile, default=str))
        self.client.log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", context)])])

    def artifact_uri(self, run_id: str, path: str) -> str:
        return f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"

    # ----- registry ----------------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        run_id: str,
        artifact_path: str,
        tags: dict[str, Any],
        description: str = "",
        model_id: str | None = None,
        model_tags: dict[str, Any] | None = None,
        model_description: str | None = None,
    ) -> str:
        """New version of registered model `name` pointing at the run's artifact `artifact_path` (or at the logged
        model `model_id`, whose URI `artifact_path` then is); returns the version."""
        try:
            self.client.create_registered_model(name, description=model_description or description)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
            if model_description:
                self.client.update_registered_model(name, description=model_description)
        for k, v in (model_tags or {}).items():
            self.client.set_registered_model_tag(name, k, str(v))
        source = artifact_path if model_id else self.artifact_uri(run_id, artifact_path)
        with process_uris(self.tracking_uri):  # a `models:/m-…` source is resolved through the process-wide URI
            mv = self.client.create_model_version(
                name,
                source=source,
                run_id=run_id,
                tags={k: str(v) for k, v in tags.items()},
                description=description,
                model_id=model_id,
            )
        return str(mv.version)

    def version_of_run(self, name: str, run_id: str) -> str | None:
        """The version of `name` this run already registered, if any (registration is once per run and model)."""
        try:
            found = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        except MlflowException:
            return None
        return str(min(int(v.version) for v in found)) if found else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


class TrackingUnreachableError(ValueError):
    """The MLflow tracking server does not answer; str() is one line naming it and the fix."""


def check_tracking_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with one line, when an http(s) tracking URI does not answer its /health endpoint (MLflow's
    own clients retry an unreachable server for minutes). Other URIs (sqlite, file, databricks) pass."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered: a server behind auth or a proxy may refuse /health, MLflow will say the rest
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnreachableError(
            f"the MLflow tracking server {tracking_uri} does not answer ({reason}): start it, or set tracking.uri / "
            "MLFLOW_TRACKING_URI to one that runs"
        ) from None


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
    """Download registered SAE `ref` into `dst`; returns the checkpoint directory (safetensors + cfg.json).

    A failed pull creates nothing: no MLflow store where there was none (a missing local one is a RegistryError),
    and no `dst` (the download goes to a directory beside it, renamed into place when complete)."""
    import mlflow

    from saeflow.storage.checkpoints import checkpoint_dir, give_normal_modes
    from saeflow.storage.registry import open_registry

    uri = model_uri(ref)
    with open_registry(tracking_uri):  # a missing local store fails here, before MLflow would create one
        pass
    target = os.path.abspath(dst)
    fresh = not os.path.exists(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    into = tempfile.mkdtemp(prefix=".pull-", dir=os.path.dirname(target)) if fresh else target
    try:
        with process_uris(tracking_uri):
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=into)
    except MlflowException as e:
        if fresh:
            shutil.rmtree(into, ignore_errors=True)
        raise ValueError(f"cannot pull {ref!r} from {tracking_uri}: {e.message.splitlines()[0]}") from e
    if fresh:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(into, 0o777 & ~umask)  # mkdtemp's 0700 is not what a directory made by `pull` should have
        os.rename(into, target)
        path = os.path.normpath(os.path.join(target, os.path.relpath(path, into)))
    give_normal_modes(path)
    return checkpoint_dir(path)


def open_sae_runs(
    tr: Tracker,
    site: str,
    specs: list,
    parent_run_id: str,
    params: dict[str, Any],
    ckpt,
    tags: dict[str, str] | None = None,
) -> list[str]:
    """One nested MLflow run per SAE. A resumed group continues the runs its checkpoint names, moved under the
    current parent run; if those are gone it starts new ones and replays the checkpoint's metric history."""
    if ckpt is not None:
        runs = ckpt.record.runs
        try:
            alive = len(runs) == len(specs) and all(tr.client.get_run(r).info.lifecycle_stage == "active" for r in runs)
        except MlflowException:
            alive = False
        if alive:
            for run_id in runs:
                tr.client.update_run(run_id, status="RUNNING")
                tr.set_tags(
                    run_id, {"mlflow.parentRunId": parent_run_id, "resumed_at_tokens": ckpt.tokens_seen, **(tags or {})}
                )
            return runs
    runs = []
    for spec in specs:
        run_tags = {"site": site, "architecture": spec.architecture, **(tags or {})}
        if code_version():
            run_tags["mlflow.source.git.commit"] = code_version()
        run_id = tr.start_run(f"{site}/{spec.label()}", parent_run_id, run_tags)
        tr.log_params(run_id, {"sae": spec.model_dump(), **params})
        runs.append(run_id)
    for run_id, hist in zip(runs, ckpt.record.history if ckpt else []):
        for m in hist:
            tr.log_metrics(run_id, {k: v for k, v in m.items() if k != "tokens"}, step=m["tokens"], prefix="train/")
    return runs


class StepLogger:
    """Logs each SAE's per-step training metrics (`train/...`, step = tokens seen) to its run. A resumed group
    replays the steps between its checkpoint and the kill; those are in MLflow already and are not logged again."""

    def __init__(self, tr: Tracker, runs: list[str], resumed: bool):
        self.tr, self.runs = tr, runs
        self.logged_until = [tr.last_step(r, "train/loss") if resumed else -1 for r in runs]

    def log(self, i: int, tokens: int, metrics: dict[str, float]) -> None:
        if tokens > self.logged_until[i]:
            self.tr.log_metrics(self.runs[i], metrics, step=tokens, prefix="train/")


class NonFiniteModelError(ValueError):
    """An SAE with NaN/inf weights was about to be registered; str() is one line naming the model and the fix."""


def publish_sae(
    tr: Tracker,
    run_id: str,
    sae,
    metadata: dict[str, Any],
    name: str,
    tags: dict[str, Any],
    alias: str | None,
    curves=None,
    description: str = "",
    model_tags: dict[str, Any] | None = None,
    model_description: str | None = None,
) -> str:
    """Log the SAE as its run's MLflow model (and its training-curves figure), register it as a new version of
    `name` with `tags`, point `alias` at it, and tag the run with the version. Returns the version.

    Idempotent per (run, model): a run that already registered `name` (a rerun after a kill between two SAEs'
    registrations) gets its existing version back, aliased again, and no new one. Non-finite weights are refused
    before anything is logged."""
    from saeflow.storage.checkpoints import save_sae

    bad = [k for k, v in sae.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise NonFiniteModelError(
            f"{name}: the trained SAE has NaN/inf in {', '.join(bad)}; it is not registered (lower the lr or "
            "check the activations for NaN/inf)"
        )
    existing = tr.version_of_run(name, run_id)
    if existing is not None:
        if alias:
            tr.set_alias(name, alias, existing)
        tr.set_tags(run_id, {"registered_model": name, "registered_version": existing})
        return existing

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_sae(sae, os.path.join(tmp, "sae"), metadata)
        uri, model_id = tr.log_sae_model(
            run_id, ckpt, sae.d_in, sae.d_sae, {k: str(v) for k, v in tags.items() if k in ("site", "architecture")}
        )
    if curves is not None:
        tr.log_figure(run_id, curves, "plots/training_curves.png")
    version = tr.register(
        name,
        run_id,
        uri,
        {"d_in": sae.d_in, "d_sae": sae.d_sae, **tags},
        description=description,
        model_id=model_id,
        model_tags=model_tags,
        model_description=model_description,
    )
    if alias:
        tr.set_alias(name, alias, version)
    tr.set_tags(run_id, {"registered_model": name, "registered_version": version})
    return version


@functools.lru_cache(maxsize=1)
def code_version() -> str | None:
    """The git commit saeflow runs from (with `-dirty` when the tree has changes), None outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def log_evaluation(
    tr: Tracker,
    run_id: str,
    metrics: dict[str, float],
    record: dict[str, Any],
    firing_frequency: Any,
    figures: dict[str, Any],
    report: str | None = None,
) -> None:
    """Write an evaluation as handed over: metrics (`eval/...`), `eval/metrics.json` (`record`),
    `eval/firing_frequency.npy`, each figure at its artifact path (closed after), and `reports/latents.html`."""
    import matplotlib.pyplot as plt
    import numpy as np

    tr.log_metrics(run_id, metrics, prefix="eval/")
    tr.log_dict(run_id, record, "eval/metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "firing_frequency.npy")
        np.save(path, np.asarray(firing_frequency))
        tr.log_artifact(run_id, path, "eval")
    for name, fig in figures.items():
        tr.log_figure(run_id, fig, name)
        plt.close(fig)
    if report is not None:
        tr.log_text(run_id, report, "reports/latents.html")
