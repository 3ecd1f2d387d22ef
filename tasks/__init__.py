"""The pipeline's Prefect tasks and MLflow helpers — the only place (with `flows/`) that imports them.

Importing this package first sets the offline defaults, so neither Prefect nor MLflow tries to
phone home and a busy 2-core machine still gets its temporary Prefect server up in time.
"""

import os

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # our summary says where to look, once
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # logging a model copies its folder: no bar per stage
}
# A tracking server that dies mid-run: MLflow's client retries each request 7 times with backoff
# (about 4 minutes a request, and a stage makes several: measured, still retrying 15 min later).
# Two retries and a 30 s timeout fail in seconds with the one-line error (gptcore/errors.py).
# A value the user exported wins.
TRACKING_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
for _k, _v in {**OFFLINE_DEFAULTS, **TRACKING_DEFAULTS}.items():
    os.environ.setdefault(_k, _v)
