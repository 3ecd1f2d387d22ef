"""The temporary Prefect server's app: Prefect's own, whose "busy, retry" answers say "retry in 50 ms".

Prefect's server answers 503 when its sqlite database is busy (`is_client_retryable_exception`:
SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT), and Prefect's client then waits 2**attempt seconds (2 s, with
jitter) unless the answer carries a `Retry-After` header, which it honours. On a cached rerun this
happens about one run in three, measured (benchmarks/rerun.py --timeline): the server's task-run
recorder commits the previous tasks' states between the read and the write of the next sub-flow's
`POST /api/task_runs/`, and the rerun waits 2 s for a write that succeeds at once when retried.
A local sqlite lock clears in milliseconds, so this app adds `Retry-After: 0.05` to a 503 that has
none; the client still retries as often as it would (PREFECT_CLIENT_MAX_RETRIES), only sooner.

flows/server.py starts uvicorn with `--factory flows.server_app:create_app`; only that process
imports this module (and prefect.server).
"""

from __future__ import annotations

RETRY_AFTER = b"0.05"  # seconds


class RetrySoon:
    """ASGI middleware: a 503 response without Retry-After gets `Retry-After: RETRY_AFTER`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_retry_soon(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    message = {**message, "headers": headers + [(b"retry-after", RETRY_AFTER)]}
            await send(message)

        return await self.app(scope, receive, send_retry_soon)


def create_app():
    """Prefect's app (`prefect.server.api.server.create_app`, configured by the environment), wrapped."""
    from prefect.server.api.server import create_app as prefect_app

    return RetrySoon(prefect_app())
