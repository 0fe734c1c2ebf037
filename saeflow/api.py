"""The small public API the `saeflow` CLI sits on (and a notebook may use): everything that is not a flow.

Each function takes plain values, uses the MLflow URI given or `saeflow.env.default_tracking_uri()`, and raises
one of `USER_ERRORS` (str() is one line naming the fix) for bad input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow.config import ConfigError, PipelineConfig, load_config
from saeflow.env import default_tracking_uri, take_credentials
from saeflow.sae.device import DeviceError
from saeflow.sae.evaluation.frontier import higher_is_better
from saeflow.sae.lm.models import ModelLoadError
from saeflow.sae.lm.sites import SiteError
from saeflow.sae.training import NonFiniteLossError, TrainingMemoryError
from saeflow.storage.faults import environment_failure
from saeflow.storage.integrity import CorruptChunkError
from saeflow.storage.locks import RootBusyError, RootNotWritableError

if TYPE_CHECKING:
    from saeflow.storage.registry import VersionRow

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    NonFiniteLossError,
    TrainingMemoryError,
    RootBusyError,
    RootNotWritableError,
    CorruptChunkError,
    DeviceError,
    ModelLoadError,
    SiteError,
    FileNotFoundError,
    KeyError,
    ValueError,
)
"""Errors that mean "the input is wrong", not "saeflow is broken": the CLI prints them as one `error:` line."""

__all__ = [
    "USER_ERRORS",
    "check_sae_reference",
    "environment_failure",
    "export",
    "higher_is_better",
    "list_models",
    "load_config",
    "promote",
    "pull",
    "results_table",
]


def _uri(tracking_uri: str | None) -> str:
    return take_credentials(tracking_uri) if tracking_uri else default_tracking_uri()


def pull(ref: str, dst: str, tracking_uri: str | None = None) -> str:
    """Download registered SAE `ref` (NAME, NAME@ALIAS, NAME/VERSION) into `dst`; returns the checkpoint directory."""
    from saeflow.storage.tracking import pull as pull_model

    return pull_model(ref, dst, _uri(tracking_uri))


def export(source: str, dst: str, fmt: str = "saelens", tracking_uri: str | None = None) -> str:
    """Write SAE `source` (a registered NAME[@ALIAS|/VERSION], or a directory `pull` or training wrote) in format
    `fmt` into the new or empty directory `dst`; returns `dst`. Only `saelens` (SAELens' inference format, the
    input scale folded into the weights, the site's TransformerLens hook name) exists."""
    from saeflow.storage.saelens import export_saelens_from

    if fmt != "saelens":
        raise ValueError(f"unknown export format {fmt!r}: use --format saelens")
    return export_saelens_from(source, dst, _uri(tracking_uri))


def results_table(run_id: str = "latest", tracking_uri: str | None = None) -> str:
    """The results table (markdown) a pipeline or sweep run printed at its end, from its MLflow parent run;
    `latest` is the newest run that has one."""
    from saeflow.storage.registry import open_registry, read_results_table

    with open_registry(_uri(tracking_uri)) as tr:
        return read_results_table(tr, run_id)


def list_models(pattern: str = "*", tracking_uri: str | None = None) -> list[VersionRow]:
    """Every version of the registered SAEs whose name matches the glob `pattern`, with aliases and metrics."""
    from saeflow.storage.registry import list_versions, open_registry

    with open_registry(_uri(tracking_uri)) as tr:
        return list_versions(tr, pattern)


def promote(name: str, version: str, alias: str = "champion", tracking_uri: str | None = None) -> str | None:
    """Point `alias` of registered model `name` at `version` by hand; returns the version it pointed at before."""
    from saeflow.storage.registry import open_registry, promote_manually

    with open_registry(_uri(tracking_uri)) as tr:
        return promote_manually(tr, name, version, alias)


def check_sae_reference(cfg: PipelineConfig, ref: str, site: str | None = None) -> None:
    """Find and load the SAE `ref` and check it fits `site` of the config's model: fails fast, before a flow run."""
    from saeflow.tasks.sae_reference import resolve_sae_reference

    resolve_sae_reference.fn(cfg, ref, site)
