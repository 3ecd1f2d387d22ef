"""MLflow 3's UI shows our runs where a reviewer looks for them.

Fast: the experiment kind tag is one MLflow's UI bundle knows, the printed link opens the classic
runs view (`workflowType=machine_learning`) on the port `make ui` serves (`PORT`).

Slow: a real browser. A tiny `gptcore run` fills a sqlite store, `mlflow ui` serves it on a free
port, and headless Chromium renders the link the run printed and the registered model's page
(`--dump-dom`); the DOM must show the pipeline run's metrics and the registry's aliases as MLflow's
own client reports them. Needs Chromium (Debian: `apt-get install chromium`); skipped, saying so,
where it is missing. Run it with `.venv/bin/python -m pytest tests/test_mlflow_ui.py -m slow`.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.runner import format_report
from servers import free_port
from tasks import tracking
from test_pipeline_real import TINY, started, wait_http

REPO = Path(__file__).resolve().parents[1]
UI_JS = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"  # the UI `mlflow ui` serves


def test_experiment_kind_is_the_ui_bundles_model_training_kind(tmp_path):
    """The tag MLflow's UI reads (`mlflow.experimentKind`) set to a kind its bundle maps to the
    machine-learning workflow; an experiment created before the tag existed is marked on next use."""
    bundle = "".join(p.read_text(errors="ignore") for p in UI_JS.glob("*.js"))
    assert f'"{tracking.EXPERIMENT_KIND_TAG}"' in bundle
    assert re.search(rf'CUSTOM_MODEL_DEVELOPMENT="{tracking.EXPERIMENT_KIND}"', bundle)
    assert re.search(r"case \w+\.Gk\.CUSTOM_MODEL_DEVELOPMENT:.{0,300}return \w+\.g\$\.MACHINE_LEARNING", bundle)
    assert 'MACHINE_LEARNING="machine_learning"' in bundle and 'get("workflowType")' in bundle

    c = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    new = tracking.experiment_id(c, "fresh")
    old = c.create_experiment("older")  # as an earlier gptcore made it: no kind
    assert tracking.experiment_id(c, "older") == old
    for exp in (new, old):
        assert c.get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


def _report(uri: str) -> dict:
    return {"rows": [{"stage": "download", "status": "cached", "seconds": 0.1, "metric": "-"}], "uri": uri,
            "experiment": "tiny", "experiment_id": "3", "run_id": "abc123", "store": "/s"}


def test_printed_link_opens_the_runs_view_on_make_uis_port(monkeypatch):
    monkeypatch.setenv("PORT", "5123")
    text = format_report(_report("sqlite:////x/mlflow.db"))
    assert "http://127.0.0.1:5123/#/experiments/3/runs/abc123?workflowType=machine_learning" in text
    assert "--port 5123" in text and '"Model registry"' in text
    monkeypatch.delenv("PORT")
    assert "http://127.0.0.1:5000/#/experiments/3/runs/abc123?workflowType=machine_learning" in format_report(_report("sqlite:////x/mlflow.db"))
    remote = format_report(_report("http://mlflow.example:8080"))
    assert "http://mlflow.example:8080/#/experiments/3/runs/abc123?workflowType=machine_learning" in remote


# ----------------------------------------------------------------------------------------------
# the real browser


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)


def rendered(browser: str, url: str, profile: Path, want: str, tries: int = 6) -> str:
    """The DOM of `url` after its scripts ran (Chromium's --dump-dom), re-rendered until it holds
    `want` (the UI fetches its data after the first paint; a busy machine may need a second look)."""
    dom = ""
    for i in range(tries):
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               f"--user-data-dir={profile}", f"--virtual-time-budget={15000 * (i + 1)}", "--dump-dom", url]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
        if want in text_of(dom):
            return dom
        time.sleep(2)
    return dom


def text_of(dom: str) -> str:
    """The visible text of a DOM dump: scripts and styles dropped, tags to spaces, entities decoded."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).replace("\xa0", " ")


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
def test_pipeline_run_and_registry_aliases_render_in_a_real_browser(tmp_path, run_cli):
    port = free_port()
    store = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [a for o in TINY for a in ("--set", o)]
    r = run_cli("run", REPO / "configs/tiny.yaml", *sets, env={"MLFLOW_TRACKING_URI": store, "PORT": str(port)}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    link = re.search(r"then open\s+(\S+)", r.stdout).group(1)
    assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/")

    c = MlflowClient(tracking_uri=store)
    run = c.get_run(link.split("/runs/")[1].split("?")[0])
    assert run.info.run_name == "pipeline"
    metrics = {k: v for k, v in run.data.metrics.items()
               if k in ("pretrain.val_loss", "evaluate.val_bpb", "evaluate.unigram_bpb", "finetune.val_loss_after")}
    assert len(metrics) == 4
    aliases = c.get_registered_model("gptcore-pretrained").aliases  # {alias: version}
    assert set(aliases) == {"champion", "candidate"}

    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store, "--port", str(port)]
    with started(cmd, tmp_path, env, tmp_path / "mlflow-ui.log") as ui:
        wait_http(f"http://127.0.0.1:{port}/health", proc=ui)
        browser = chromium()

        page = text_of(rendered(browser, link, tmp_path / "chrome", "evaluate.val_bpb"))
        for key, value in metrics.items():  # the run page's metrics table: name, then MLflow's value
            assert re.search(rf"{re.escape(key)} {re.escape(repr(value))}", page), (key, value, page[:3000])
        # the classic runs view (tabs Runs / Models / Model registry), not the GenAI one ("Evaluations")
        assert "Model metrics" in page and "Model registry" in page
        assert "Evaluations" not in page and "Observability" not in page

        dom = rendered(browser, f"http://127.0.0.1:{port}/#/models/gptcore-pretrained", tmp_path / "chrome", "@ champion")
        shown = set(re.findall(r"modelversionaliastag[^>]*>(?:<[^>]+>)*@(?:&nbsp;|\xa0| )([\w-]+)<", dom))
        assert shown == set(aliases), text_of(dom)[:3000]
