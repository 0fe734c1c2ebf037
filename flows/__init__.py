"""Prefect flows: they only compose tasks; each reads like the pipeline diagram."""

if __name__ != "saeflow.flows":  # only ever imported as part of saeflow
    raise ImportError(f"import saeflow.flows, not {__name__}")
