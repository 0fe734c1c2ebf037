"""Thin Prefect tasks: typed config in, artifact reference out. The work itself lives in sae/ and storage/."""

if __name__ != "saeflow.tasks":  # only ever imported as part of saeflow
    raise ImportError(f"import saeflow.tasks, not {__name__}")
