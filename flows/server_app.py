"""The temporary Prefect server's app: Prefect's own, which retries a "database busy" answer itself.

Prefect's server answers 503 when its sqlite database is busy (`is_client_retryable_exception`:
SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT; the failed transaction is rolled back), and Prefect's client
then resends the request after 2**attempt seconds (2 s, 4 s, ... with jitter). On a cached rerun
this happened about one run in three, measured (benchmarks/rerun.py's timeline): the server's
task-run recorder commits the previous tasks' states between the read and the write of the next
sub-flow's `POST /api/task_runs/`, and the rerun waited 2 s for a write that succeeds at once when
resent. A local sqlite lock clears in milliseconds, so this app resends such a request to
Prefect's app itself after 50, 100, 200 and 400 ms — the same request the client would resend —
and only then passes the 503 on: the client's own backoff (its patience for a database that stays
busy) still follows, unchanged.

flows/server.py starts uvicorn with `--factory flows.server_app:create_app`; only that process
imports this module (and prefect.server).
"""

from __future__ import annotations

import asyncio

DELAYS = (0.05, 0.1, 0.2, 0.4)  # seconds before each resend of a request answered 503


class RetryBusy:
    """ASGI middleware: an HTTP request the app answers 503 is resent to it after each of `DELAYS`;
    the first other answer, or the last 503, goes to the client."""

    def __init__(self, app, delays: tuple[float, ...] = DELAYS):
        self.app, self.delays = app, delays

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan, websockets (Prefect's events): untouched
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # Prefect's requests are small JSON documents: hold the body to resend it
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body, more = body + message.get("body", b""), message.get("more_body", False)
        for delay in (*self.delays, None):
            busy = []

            async def send_unless_busy(message, last=delay is None):
                if message["type"] == "http.response.start" and message["status"] == 503 and not last:
                    busy.append(message)
                elif not busy:
                    await send(message)

            try:
                await self.app(dict(scope),  # a fresh copy: routing writes into the scope (a mount's root_path)
                               _replay([{"type": "http.request", "body": body, "more_body": False}], receive),
                               send_unless_busy)
            except Exception:
                if not busy:  # Starlette re-raises after sending an error page: only a held 503's is ours
                    raise
            if not busy:
                return
            await asyncio.sleep(delay)


def _replay(messages: list[dict], receive):
    """A `receive` that gives `messages` first, then whatever the connection sends (its disconnect)."""
    queue = list(messages)

    async def replay():
        return queue.pop(0) if queue else await receive()

    return replay


def create_app():
    """Prefect's app (`prefect.server.api.server.create_app`, configured by the environment), wrapped."""
    from prefect.server.api.server import create_app as prefect_app

    return RetryBusy(prefect_app())
