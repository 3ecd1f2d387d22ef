"""An opt-in timeline of one `gptcore run` process: where a cached rerun's seconds go.

    GPTCORE_TIMELINE=/tmp/t.log gptcore run configs/tiny.yaml
    0.412 cli: run
    0.431 server: launched
    ...

Off (no file, nothing patched, every `mark` a dict lookup) unless GPTCORE_TIMELINE names a file.
Each line is "<seconds since the process started> <label>", appended as it happens. The origin is
GPTCORE_TIMELINE_T0 (a `time.time()` the caller took just before starting the process:
benchmarks/rerun.py sets it) or else the process's start time from /proc (10 ms resolution).

`instrument()` (after Prefect and MLflow are imported) also writes one line per Prefect API
request ("api POST /api/task_runs/ 0.004") and per outermost MlflowClient call ("mlflow
log_batch 0.006"), so the round trips of a cached rerun can be counted (benchmarks/rerun.py
--timeline). This module imports nothing heavy.
"""

from __future__ import annotations

import functools
import os
import time

_FILE = {"path": os.environ.get("GPTCORE_TIMELINE") or None, "t0": None}


def on() -> bool:
    return _FILE["path"] is not None


def _origin() -> float:
    if _FILE["t0"] is None:
        given = os.environ.get("GPTCORE_TIMELINE_T0")
        if given:
            _FILE["t0"] = float(given)
        else:  # /proc/self/stat field 22: start time in clock ticks since boot
            with open("/proc/self/stat", "rb") as f:
                ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
            with open("/proc/uptime") as f:
                since_boot = float(f.read().split()[0])
            _FILE["t0"] = time.time() - since_boot + ticks / os.sysconf("SC_CLK_TCK")
    return _FILE["t0"]


def mark(label: str) -> None:
    """Append "<seconds since process start> <label>" to the timeline (a no-op when it is off)."""
    if _FILE["path"] is None:
        return
    with open(_FILE["path"], "a") as f:
        f.write(f"{time.time() - _origin():.3f} {label}\n")


def _status(result) -> str:
    """An HTTP response's status code; "" for anything else."""
    return f" {result.status_code}" if hasattr(result, "status_code") else ""


def _timed(fn, label, depth: list[int]):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth[0] += 1
        t, status = time.perf_counter(), " raised"
        try:
            result = fn(*args, **kwargs)
            status = _status(result)
            return result
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                mark(f"{label(args)} {time.perf_counter() - t:.3f}{status}")
    return wrapper


def _timed_async(fn, label):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        t, status = time.perf_counter(), " raised"
        try:
            result = await fn(*args, **kwargs)
            status = _status(result)
            return result
        finally:
            mark(f"{label(args)} {time.perf_counter() - t:.3f}{status}")
    return wrapper


def instrument() -> None:
    """With the timeline on: one line per Prefect API request and per outermost MlflowClient call."""
    if _FILE["path"] is None or _FILE.get("instrumented"):
        return
    _FILE["instrumented"] = True
    import httpx
    from mlflow.tracking import MlflowClient

    api = os.environ.get("PREFECT_API_URL", "")

    def request(args) -> str:
        req = args[1]
        where = "api" if api and str(req.url).startswith(api.rsplit("/api", 1)[0]) else "http"
        return f"{where} {req.method} {req.url.path}"

    httpx.AsyncClient.send = _timed_async(httpx.AsyncClient.send, request)
    httpx.Client.send = _timed(httpx.Client.send, request, [0])
    depth = [0]
    for name in dir(MlflowClient):
        fn = getattr(MlflowClient, name)
        if not name.startswith("_") and callable(fn):
            setattr(MlflowClient, name, _timed(fn, lambda args, n=name: f"mlflow {n}", depth))
