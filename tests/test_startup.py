"""Start-up costs users pay on every command: which Prefect API `gptcore run` talks to
(flows/server.py; the temporary server itself runs end to end in tests/test_pipeline_cli.py), and
what reading a config or keying a cached stage must not import."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flows import server

ROOT = Path(__file__).resolve().parents[1]


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  (http.server's name)
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    httpd.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_probe(fake_api):
    assert server.healthy(fake_api)
    assert not server.healthy(f"http://127.0.0.1:{_closed_port()}/api")


def test_a_set_api_url_is_used_and_nothing_starts(monkeypatch, fake_api):
    monkeypatch.setenv("PREFECT_API_URL", fake_api)
    monkeypatch.setattr(server, "TemporaryServer", lambda: pytest.fail("started a server"))
    with server.prefect_api() as ready:
        ready()
        assert server.os.environ["PREFECT_API_URL"] == fake_api


def test_a_set_api_url_that_nothing_answers_is_a_user_error(monkeypatch):
    from gptcore.errors import GptcoreError

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_closed_port()}/api")
    monkeypatch.setattr(server, "TemporaryServer", lambda: pytest.fail("started a server"))
    with pytest.raises(GptcoreError, match=r"no Prefect API answers .*\(PREFECT_API_URL\)"):
        with server.prefect_api():
            pytest.fail("ran with an API that is not there")


def test_a_running_local_server_is_reused(monkeypatch, fake_api):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_LOCAL_SERVER", fake_api)
    monkeypatch.setattr(server, "TemporaryServer", lambda: pytest.fail("started a server"))
    with server.prefect_api() as ready:
        ready()
        assert server.os.environ["PREFECT_API_URL"] == fake_api
    assert "PREFECT_API_URL" not in server.os.environ


def _loaded(statement: str, names=("prefect", "mlflow", "torch")) -> list[str]:
    code = f"import sys; {statement}; print(sorted(m for m in {names!r} if m in sys.modules))"
    return eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=ROOT).stdout)


def test_server_module_imports_nothing_heavy():
    assert _loaded("import flows.server") == []


def test_reading_a_config_and_sharding_never_import_torch():
    assert _loaded("from gptcore.config import load_config; import gptcore.data.sharding; load_config('configs/tiny.yaml')") == []


def test_a_cached_stage_is_keyed_without_torch():
    """The pipeline imports the engines (and torch) only when a stage really runs."""
    assert _loaded("import flows.pipeline; from tasks.stages import STAGES; [s.reads for s in STAGES.values()]",
                   ("torch",)) == []
