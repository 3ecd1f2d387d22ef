"""Where the MLflow tracking store is, and whether it can be used: checked before any work starts.

`gptcore run` and `gptcore sweep` call `check_tracking_store` before the Prefect server starts and
before MLflow is imported (this module imports neither), so a bad `MLFLOW_TRACKING_URI` costs a
second, not a pipeline's worth of retries and tracebacks:

    sqlite:///PATH   the folder of PATH must exist (it is never created) and be writable
    file:PATH, PATH  MLflow's file store: its parent folder must exist and be writable
    http(s)://HOST   a server must answer there (one request, a 2 s timeout; MLflow's own client
                     would retry with backoff for minutes)
"""

from __future__ import annotations

import http.client
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from gptcore.config import Config
from gptcore.errors import SetupError

DEFAULT_URI = "sqlite:///mlflow.db"
_WHERE = "MLFLOW_TRACKING_URI / tracking.tracking_uri"


def tracking_uri(cfg: Config) -> str:
    """`tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else MLflow's default sqlite file (absolute)."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def check_tracking_store(uri: str, timeout: float = 2.0) -> None:
    """Raise `SetupError` (one line: the store, the fix) when MLflow could not use `uri`."""
    parts = urlsplit(uri)
    if uri.startswith("sqlite:///"):
        _check_folder(Path(uri[len("sqlite:///"):]), uri)
    elif parts.scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif parts.scheme in ("", "file"):
        path = Path(parts.path if parts.scheme == "file" else uri).expanduser()
        _check_folder(path / "x" if path.is_dir() else path, uri)


def _check_folder(path: Path, uri: str) -> None:
    """The folder that holds `path` exists (we never create it) and takes a new file."""
    folder = path.parent
    if not folder.is_dir():
        raise SetupError("the MLflow tracking store's folder does not exist", str(folder),
                         f"create it (mkdir -p {folder}) or set {_WHERE} to a folder that exists")
    try:
        if path.exists():
            with open(path, "r+b"):
                pass
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".gptcore-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SetupError(f"cannot write the MLflow tracking store ({exc.strerror or exc})", uri,
                         f"make {folder} writable or set {_WHERE} to a writable place") from None


def _check_server(uri: str, timeout: float) -> None:
    """Any HTTP answer from {uri}/health counts (a server behind a proxy may say 401); no answer fails."""
    u = urlsplit(uri)
    conn_type = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.request("GET", u.path.rstrip("/") + "/health")
        conn.getresponse().read()
    except OSError as exc:
        raise SetupError(f"no MLflow tracking server answers ({exc.strerror or exc.__class__.__name__})", uri,
                         f"start it (mlflow server --host {u.hostname} --port {u.port or conn.default_port}), or unset "
                         "MLFLOW_TRACKING_URI to use a local sqlite store") from None
    finally:
        conn.close()
