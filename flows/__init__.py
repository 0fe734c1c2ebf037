import saeflow  # noqa: F401  (offline defaults before Prefect/MLflow import)
