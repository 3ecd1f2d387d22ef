"""The Prefect API a `gptcore run` talks to: a running server when one is up, else a temporary one
started first thing, so that its start-up overlaps our own imports instead of following them.

Without PREFECT_API_URL, Prefect 3 starts a temporary server itself (a uvicorn subprocess,
`prefect.server.api.server.SubprocessASGIServer`) when the first flow needs a client: after
`import prefect`, mlflow and torch, and then it waits for /health. Its start (~3-6 s on 2 cores)
and our imports run one after the other. `prefect_api()` instead:

  1. PREFECT_API_URL is set: use that server, start nothing (nothing answers there: one error line);
  2. a Prefect server answers at `prefect server start`'s default address (PREFECT_LOCAL_SERVER,
     http://127.0.0.1:4200/api): reuse it — runs then also show in its UI;
  3. else start the same temporary server Prefect would (the same uvicorn command and environment:
     ephemeral, no UI, no background services) before anything heavy is imported, point
     PREFECT_API_URL at it, and stop it on the way out. Its app is Prefect's, wrapped by
     flows/server_app.py, which resends a request Prefect answered "database busy" within
     50-750 ms itself (Prefect's client would wait 2 s first).

Prefect's caching lives in the result storage (tasks/caching.py), not in the server's database, so
every one of these servers gives the same cache hits. This module imports nothing heavy.

The temporary server's life is tied to ours (docs/reliability.md):
  - it runs in its own process session, so a terminal's Ctrl-C (SIGINT to the foreground process
    group) reaches only gptcore, which finishes its own shutdown against a live API and then stops
    the server (`stop`);
  - it gets SIGKILL from the kernel when gptcore dies, even by SIGKILL (Linux's parent-death signal,
    prctl(PR_SET_PDEATHSIG), set between fork and exec). The kernel sends it when the *thread* that
    forked exits: `gptcore run` starts it from the main thread; started from another thread, it
    lives no longer than that thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from flows import timeline

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


def reachable(api_url: str, timeout: float = 3.0) -> bool:
    """True when something answers HTTP at `api_url` (any status: a server may want a key for /health);
    False when the connection fails (refused, unknown host, no answer within `timeout`)."""
    u = urlsplit(api_url)
    kind = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = kind(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.request("GET", (u.path.rstrip("/") or "") + "/health")
        conn.getresponse()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _check_reachable(api_url: str) -> None:
    if not reachable(api_url):
        from gptcore.errors import GptcoreError

        raise GptcoreError(f"no Prefect API answers at {api_url}", "PREFECT_API_URL",
                           "start it (`prefect server start`), fix the address, or unset PREFECT_API_URL "
                           "to use a temporary server")


def drain_prefect(timeout: float = 3.0) -> None:
    """Send Prefect's queued logs and events now, while the API is up (Prefect would do it at
    interpreter exit, after the temporary server is gone, retrying against a closed port)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn (run in the child between fork and exec) that makes the kernel SIGKILL the child
    when this thread exits; None where there is no prctl (not Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: no imports after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # we died between fork and prctl: nobody would send the signal
            os._exit(1)

    return preexec


class TemporaryServer:
    """Prefect's temporary server, started now and waited for later (`wait`), stopped by `stop`."""

    def __init__(self):
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        app_dir = Path(next(iter(importlib.util.find_spec("prefect").submodule_search_locations))).parent
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(  # Prefect's own command line (SubprocessASGIServer._run_uvicorn_command),
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",  # its app wrapped (server_app.py)
             "flows.server_app:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env,
            start_new_session=True, preexec_fn=_die_with_parent())
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
        _check_reachable(os.environ["PREFECT_API_URL"])
        try:
            yield lambda: None
        finally:
            drain_prefect()
        return
    local = os.environ.get("PREFECT_LOCAL_SERVER", DEFAULT_LOCAL)
    if local and healthy(local, timeout=0.2):
        os.environ["PREFECT_API_URL"] = local
        try:
            yield lambda: None
        finally:
            drain_prefect()
            os.environ.pop("PREFECT_API_URL", None)
        return
    server = TemporaryServer()
    timeline.mark("server: launched")
    os.environ["PREFECT_API_URL"] = server.api_url
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    try:
        yield lambda: server.wait(timeout)
    finally:
        timeline.mark("server: drain logs and events")
        if server.proc.poll() is None:
            drain_prefect()
        timeline.mark("server: stop")
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
        timeline.mark("server: stopped")
