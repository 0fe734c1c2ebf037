"""evaluate_sae: any SAE (registered, saeflow checkpoint or SAELens directory) → tokens → metrics in a new run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from saeflow.config import PipelineConfig
from saeflow.storage.integrity import locate_corruption
from saeflow.storage.locks import root_lock
from saeflow.tasks.evaluate import evaluate_sae_reference
from saeflow.tasks.preflight import preflight
from saeflow.tasks.sae_reference import resolve_sae_reference
from saeflow.tasks.tokenize import tokenize_dataset
from saeflow.tasks.tracking import publish_results


@flow(name="evaluate_sae", log_prints=True)
def evaluate_sae(config: PipelineConfig, sae: str, site: str | None = None) -> dict[str, Any]:
    """Resolve and check the SAE against the config's model, tokenize (or reuse) the dataset, evaluate on the eval
    split (MATH §5, §5.1) and log to a new MLflow run."""
    with root_lock(config.root):
        preflight(config, train=False)
        ref = resolve_sae_reference(config, sae, site)
        tokens = tokenize_dataset(config)
        try:
            out = evaluate_sae_reference(config, tokens, ref)
        except Exception as e:
            if named := locate_corruption(e, {"token store": tokens}):
                raise named from e
            raise
        publish_results(config, out["run_id"], {out["site"]: {out["label"]: out["metrics"]}}, {}, summarize=False)
        return out
