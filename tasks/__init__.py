"""Thin Prefect tasks: typed config in, artifact reference out. The work itself lives in sae/ and storage/."""

import saeflow  # noqa: F401  (offline defaults before Prefect/MLflow import)
