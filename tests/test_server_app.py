"""The temporary server's app (flows/server_app.py): Prefect's own client retries a busy 503 after
50 ms instead of its 2 s backoff, and every other answer passes through unchanged."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prefect.client import base as prefect_client_base

from flows.server_app import RetrySoon


def _app(statuses: list[int], headers: dict | None = None):
    """An ASGI app answering each request with the next status of `statuses`."""
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        status = statuses[min(len(calls), len(statuses)) - 1]
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain"), *extra]})
        await send({"type": "http.response.body", "body": b"ok"})

    app.calls = calls
    return app


def _post_with_prefects_client(app, monkeypatch) -> tuple[int, list[float]]:
    """POST once through Prefect's own retrying client; (final status, the sleeps it chose)."""
    waits: list[float] = []

    async def sleep(seconds):
        waits.append(seconds)

    monkeypatch.setattr(prefect_client_base.anyio, "sleep", sleep)

    async def go():
        async with prefect_client_base.PrefectHttpxAsyncClient(transport=httpx.ASGITransport(app=app),
                                                               base_url="http://server", raise_on_all_errors=False) as c:
            return (await c.post("/api/task_runs/", json={})).status_code

    return asyncio.run(go()), waits


def test_prefects_client_retries_a_busy_server_within_a_tenth_of_a_second(monkeypatch):
    inner = _app([503, 201])
    status, waits = _post_with_prefects_client(RetrySoon(inner), monkeypatch)
    assert status == 201 and inner.calls == ["/api/task_runs/"] * 2
    assert len(waits) == 1 and 0.05 <= waits[0] < 0.1, waits


def test_without_it_prefects_client_waits_its_backoff(monkeypatch):
    """The reference behaviour the middleware changes: the 2 s (jittered) exponential backoff."""
    status, waits = _post_with_prefects_client(_app([503, 201]), monkeypatch)
    assert status == 201 and len(waits) == 1 and waits[0] > 1.0, waits


@pytest.mark.parametrize("statuses,headers,want", [
    ([200], {}, None),                      # other answers pass unchanged
    ([500], {}, None),
    ([503], {"Retry-After": "7"}, "7"),     # a server's own Retry-After wins
])
def test_other_answers_pass_through(statuses, headers, want):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=RetrySoon(_app(statuses, headers))),
                                     base_url="http://server") as c:
            return await c.get("/api/health")

    r = asyncio.run(go())
    assert r.status_code == statuses[0] and r.text == "ok"
    assert r.headers.get("retry-after") == want
