"""The Prefect API a `gptcore run` talks to: a running server when one is up, else a temporary one
started first thing, so that its start-up overlaps our own imports instead of following them.

Without PREFECT_API_URL, Prefect 3 starts a temporary server itself (a uvicorn subprocess,
`prefect.server.api.server.SubprocessASGIServer`) when the first flow needs a client: after
`import prefect`, mlflow and torch, and then it waits for /health. Its start (~3-6 s on 2 cores)
and our imports run one after the other. `prefect_api()` instead:

  1. PREFECT_API_URL is set: use that server, start nothing;
  2. a Prefect server answers at `prefect server start`'s default address (PREFECT_LOCAL_SERVER,
     http://127.0.0.1:4200/api): reuse it — runs then also show in its UI;
  3. else start the same temporary server Prefect would (the same uvicorn command and environment:
     ephemeral, no UI, no background services) before anything heavy is imported, point
     PREFECT_API_URL at it, and stop it on the way out.

Prefect's caching lives in the result storage (tasks/caching.py), not in the server's database, so
every one of these servers gives the same cache hits. This module imports nothing heavy.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

DEFAULT_LOCAL = "http://127.0.0.1:4200/api"


def healthy(api_url: str, timeout: float = 0.5) -> bool:
    """True when a Prefect API answers GET {api_url}/health with 200 (a refused port answers at once)."""
    u = urlsplit(api_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    try:
        conn.request("GET", (u.path.rstrip("/") or "") + "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """Prefect's temporary server, started now and waited for later (`wait`), stopped by `stop`."""

    def __init__(self):
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        app_dir = Path(next(iter(importlib.util.find_spec("prefect").submodule_search_locations))).parent
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(  # Prefect's own command line (SubprocessASGIServer._run_uvicorn_command)
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env)
        atexit.register(self.stop)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not healthy(self.api_url):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                                   "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a busy machine)")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def prefect_api() -> Iterator[callable]:
    """Choose (or start) the server; yields `ready()`, to call before the first flow runs.

        with prefect_api() as ready:
            from flows.pipeline import run_pipeline   # heavy imports overlap the server's start
            ready()
            run_pipeline(...)
    """
    if os.environ.get("PREFECT_API_URL"):
        yield lambda: None
        return
    local = os.environ.get("PREFECT_LOCAL_SERVER", DEFAULT_LOCAL)
    if local and healthy(local, timeout=0.2):
        os.environ["PREFECT_API_URL"] = local
        try:
            yield lambda: None
        finally:
            os.environ.pop("PREFECT_API_URL", None)
        return
    server = TemporaryServer()
    os.environ["PREFECT_API_URL"] = server.api_url
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    try:
        yield lambda: server.wait(timeout)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
