"""The temporary server's app (flows/server_app.py), driven by Prefect's own retrying client: a busy
503 is resent by the server within a fraction of a second instead of the client's 2 s backoff; a
database that stays busy still gets the client's backoff after that; other answers pass unchanged."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prefect.client import base as prefect_client_base

from flows import server_app
from flows.server_app import RetryBusy


def _app(statuses: list[int]):
    """An ASGI app answering each request with the next status of `statuses` (the last one repeats);
    after a 503 it raises, as Starlette's ServerErrorMiddleware re-raises after Prefect's error handler
    has sent its answer."""
    bodies = []

    async def app(scope, receive, send):
        if scope.get("root_path"):  # as a mount does: routing writes into the scope, so a resend needs a fresh one
            await send({"type": "http.response.start", "status": 404, "headers": []})
            return await send({"type": "http.response.body", "body": b"{}"})
        scope["root_path"] = "/api"
        message = await receive()
        bodies.append(message["body"])
        status = statuses[min(len(bodies), len(statuses)) - 1]
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"status": status}).encode()})
        if status == 503:
            raise RuntimeError("database is locked")

    app.bodies = bodies
    return app


def _raise_after_answering(app):
    """What a server does with the exception raised after an answer was sent: logs it (uvicorn)."""
    async def served(scope, receive, send):
        try:
            await app(scope, receive, send)
        except RuntimeError:
            pass

    return served


@pytest.fixture
def waits(monkeypatch):
    """The sleeps the server (`server`) and Prefect's client (`client`) chose, without sleeping."""
    chosen = {"server": [], "client": []}

    async def server_sleep(seconds):
        chosen["server"].append(seconds)

    async def client_sleep(seconds):
        chosen["client"].append(seconds)

    monkeypatch.setattr(server_app.asyncio, "sleep", server_sleep)
    monkeypatch.setattr(prefect_client_base.anyio, "sleep", client_sleep)
    return chosen


def _post(app, payload: dict) -> httpx.Response:
    """POST once through Prefect's own client (`PrefectHttpxAsyncClient`, its retries included)."""
    async def go():
        async with prefect_client_base.PrefectHttpxAsyncClient(transport=httpx.ASGITransport(app=app),
                                                               base_url="http://server", raise_on_all_errors=False) as c:
            return await c.post("/api/task_runs/", json=payload)

    return asyncio.run(go())


def test_a_busy_answer_is_resent_by_the_server_at_once(waits):
    inner = _app([503, 201])
    r = _post(RetryBusy(inner), {"name": "pretrain"})
    assert r.status_code == 201 and r.json() == {"status": 201}
    assert [json.loads(b) for b in inner.bodies] == [{"name": "pretrain"}] * 2  # the same request, resent
    assert waits == {"server": [0.05], "client": []}


def test_without_it_prefects_client_waits_its_backoff(waits):
    """The reference behaviour: Prefect's client resends after its 2 s (jittered) exponential backoff."""
    r = _post(_raise_after_answering(_app([503, 201])), {"name": "pretrain"})
    assert r.status_code == 201 and len(waits["client"]) == 1 and waits["client"][0] > 1.0, waits


def test_a_database_that_stays_busy_still_gets_the_clients_backoff(waits):
    inner = _app([503, 503, 503, 503, 503, 503, 201])
    r = _post(_raise_after_answering(RetryBusy(inner)), {})
    assert r.status_code == 201 and len(inner.bodies) == 7
    assert waits["server"] == [0.05, 0.1, 0.2, 0.4, 0.05] and len(waits["client"]) == 1 and waits["client"][0] > 1.0


@pytest.mark.parametrize("status", [200, 201, 404, 409, 500])
def test_other_answers_pass_through_once(waits, status):
    inner = _app([status])
    r = _post(RetryBusy(inner), {"x": 1})
    assert r.status_code == status and r.json() == {"status": status} and len(inner.bodies) == 1
    assert waits == {"server": [], "client": []}
