"""Prefect flows: `flows.pipeline` is the whole chain (see `gptcore run`)."""

import tasks  # noqa: F401  (offline defaults before prefect/mlflow are imported)
