"""Architecture names → SAE classes. Each architecture module registers itself with `@register("name")`."""

from __future__ import annotations

from typing import Any

from saeflow.sae.architectures.base import SAE, SAEConfig

ARCHITECTURES: dict[str, type[SAE]] = {}


def register(name: str):
    """Class decorator: make an SAE class selectable by `architecture: <name>` in configs."""

    def wrap(cls: type[SAE]) -> type[SAE]:
        have = ARCHITECTURES.get(name)
        # The same class defined again (a module re-imported, e.g. from an MLflow model's code path) is no clash.
        if have is not None and (have.__module__, have.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"SAE architecture {name!r} is already registered by {have.__module__}."
                f"{have.__qualname__}: choose another name for {cls.__module__}.{cls.__qualname__}"
            )
        ARCHITECTURES[name] = cls
        return cls

    return wrap


def config_from_dict(data: dict[str, Any]) -> SAEConfig:
    arch = data.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch].config_class.model_validate(data)


def build_sae(cfg: SAEConfig | dict[str, Any], d_in: int) -> SAE:
    """Instantiate the registered class for `cfg.architecture` with input width d_in."""
    if isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    return ARCHITECTURES[cfg.architecture](cfg, d_in)
