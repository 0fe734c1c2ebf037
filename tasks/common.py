"""What several tasks share: store locations derived from the config, the MLflow tracker, the loaded model."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.states import State

from saeflow.config import PipelineConfig
from saeflow.sae.lm.models import LoadedModel, load_model
from saeflow.storage import layout
from saeflow.storage.faults import environment_failure
from saeflow.storage.integrity import corruption_kind
from saeflow.storage.model_files import resolve_model_source
from saeflow.storage.text import dataset_fingerprint
from saeflow.storage.tokens import TokenStoreRef
from saeflow.storage.tracking import Tracker


class RetryOptions(TypedDict, total=False):
    """The retry/timeout keywords of `prefect.task`, typed so `@task(**OPTIONS)` is checked like spelled-out ones."""

    retries: int
    retry_delay_seconds: list[float]
    timeout_seconds: float
    retry_condition_fn: Callable[[Any, Any, State], bool]


def retry_unless_bad_input(task: Any, task_run: Any, state: State) -> bool:
    """Retry a failed task unless it failed on bad input (a wrong path, a field, a value), on the machine (a full
    disk, a read-only file system) or on a damaged chunk: those fail again."""
    try:
        state.result()
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return False
    except BaseException as e:
        return environment_failure(e) is None and corruption_kind(e) is None
    return True


TRACKING_RETRIES = RetryOptions(
    retries=3, retry_delay_seconds=[2, 10, 30], timeout_seconds=300, retry_condition_fn=retry_unless_bad_input
)
"""Task options for steps that only talk to the tracking server: a server blip is retried, a hang is cut off."""
DOWNLOAD_RETRIES = RetryOptions(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input)
"""Task options for steps that may download (model weights, a Hub dataset): transient network errors retry."""


def group_label(site: str, specs: list) -> str:
    """How a training group is named in logs and errors: `train <site> [<label>, ...]`."""
    return f"train {site} [{', '.join(s.label() for s in specs)}]"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run; a plain logger when a task's `.fn` is called directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("saeflow")


def model_identity(cfg: PipelineConfig) -> dict:
    m = cfg.model
    return {"name": m.name, "gguf_file": m.gguf_file, "revision": m.revision, "dtype": m.dtype}


def token_store_url(cfg: PipelineConfig) -> tuple[str, dict]:
    d = cfg.dataset
    identity = {
        "dataset": d.model_dump(),
        "data": dataset_fingerprint(d.source, d.revision),
        "tokenizer": {k: v for k, v in model_identity(cfg).items() if k != "dtype"},
        "context_size": cfg.tokens.context_size,
        "prepend_bos": cfg.tokens.prepend_bos,
        "n_train": cfg.tokens.n_windows(cfg.tokens.train_tokens),
        "n_eval": cfg.tokens.n_windows(cfg.tokens.eval_tokens),
    }
    return layout.token_store_url(cfg.store_url, identity), identity


def activation_store_url(cfg: PipelineConfig, tokens: TokenStoreRef) -> tuple[str, dict]:
    identity = {
        "model": model_identity(cfg),
        "token_store": tokens.content_hash,
        "sites": list(cfg.extract.sites),
        "dtype": cfg.extract.dtype,
        "chunk_rows": cfg.extract.chunk_rows,
        "positions": "1..T-1",
    }
    return layout.activation_store_url(cfg.store_url, identity), identity


def prefect_run_tags() -> dict[str, str]:
    """MLflow run tags linking back to the Prefect flow run this code runs in (none outside a flow run)."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    return {
        "prefect.flow_run_id": flow_run.id,
        "prefect.flow_run_name": flow_run.name or "",
        "prefect.flow_run_url": flow_run.ui_url or "",
        "prefect.flow_name": flow_run.flow_name or "",
    }


def tracker(cfg: PipelineConfig) -> Tracker:
    """The MLflow tracker of this flow run: built once per flow run (and config), shared by its tasks."""
    import os

    from prefect.runtime import flow_run

    artifacts = None
    if cfg.tracking_uri.startswith("sqlite:") and not cfg.tracking.uri and "MLFLOW_TRACKING_URI" not in os.environ:
        artifacts = layout.local_artifact_location(cfg.root)
    return _tracker(flow_run.id, cfg.tracking_uri, cfg.tracking.experiment, artifacts, os.path.abspath(cfg.root))


@functools.lru_cache(maxsize=8)
def _tracker(flow_run_id: str | None, uri: str, experiment: str, artifacts: str | None, owner: str) -> Tracker:
    # Keyed by flow run: a long-lived `saeflow serve` process looks the experiment up afresh for every run.
    return Tracker(uri, experiment, artifacts, owner)


@functools.lru_cache(maxsize=1)
def _load(name: str, gguf_file: str | None, dtype: str, device: str, revision: str | None) -> LoadedModel:
    path, gguf = resolve_model_source(name, gguf_file)
    return load_model(path, gguf, dtype=dtype, device=device, revision=revision)


def loaded_model(cfg: PipelineConfig) -> LoadedModel:
    """The pipeline's model, loaded once per process and shared by extraction and evaluation."""
    m = cfg.model
    return _load(m.name, m.gguf_file, m.dtype, m.device, m.revision)


@dataclass(frozen=True)
class TrainedSAE:
    """A trained SAE as later stages see it: its MLflow run, label and registered version."""

    site: str
    label: str
    architecture: str
    run_id: str
    registered_name: str
    version: str
