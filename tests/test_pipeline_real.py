"""The real pipeline end to end (real gptcore functions, tiny overrides), against real servers.

1. `gptcore run` logging to a real `mlflow server`; checked through MLflow's REST API.
2. A Prefect deployment round trip: `prefect server start`, `gptcore deploy`, a process worker,
   `prefect deployment run ... --watch`, then the MLflow store checked.

Both start servers on free ports and stop them (worker before server) when done. Slow: a minute
or two each on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["data.max_bytes=200000", "tokenizer.vocab_size=300", "model.n_layer=1", "model.block_size=256", "train.max_steps=12",
        "train.eval_every=6", "train.eval_batches=2", "train.num_threads=1", "eval.batches=2",
        "eval.sample_tokens=8", "finetune.max_steps=4", "finetune.max_examples=48", "finetune.eval_batches=2",
        "finetune.num_samples=1", "data.num_proc=1"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(url)


@contextlib.contextmanager
def started(cmd, cwd, env, log: Path):
    """Run `cmd` in its own process group; on exit SIGTERM it (twice if needed), then SIGKILL."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield p
        finally:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if p.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=15)


def api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_pipeline_run_is_in_mlflow_server_rest_api(tmp_path, run_cli):
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db"]
    base = f"http://127.0.0.1:{port}"
    with started(cmd, tmp_path, env, tmp_path / "mlflow.log") as server:
        wait_http(base + "/health", proc=server)
        sets = [a for o in TINY for a in ("--set", o)]
        r = run_cli("run", REPO / "configs/tiny.yaml", *sets, env={"MLFLOW_TRACKING_URI": base}, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "MLflow: experiment 'tiny'" in r.stdout

        exp = api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny")["experiment"]
        runs = api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        by_name = {x["info"]["run_name"]: x for x in runs}
        assert {"pipeline", "download", "train_tokenizer", "shard", "pretrain", "evaluate", "finetune", "register"} <= set(by_name)
        assert all(x["info"]["status"] == "FINISHED" for x in runs)
        pre = by_name["pretrain"]["info"]["run_id"]
        hist = api(base, f"/api/2.0/mlflow/metrics/get-history?run_id={pre}&metric_key=loss")["metrics"]
        logged = [json.loads(x) for f in (tmp_path / ".gptcore/runs/pretrain").glob("*/metrics.jsonl")
                  for x in f.read_text().splitlines()]
        expected = [(r["step"], r["loss"]) for r in logged if "loss" in r]  # what the engine wrote
        assert len(expected) >= 2
        got = sorted((int(m["step"]), m["value"]) for m in hist)
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected])
        params = {p["key"]: p["value"] for p in by_name["pipeline"]["data"]["params"]}
        assert params["train.max_steps"] == "12" and params["tokenizer.vocab_size"] == "300"
        model = api(base, f"/api/2.0/mlflow/artifacts/list?run_id={pre}&path=model")["files"]
        assert {"model/config.json", "model/model.safetensors"} <= {f["path"] for f in model}
        ev = by_name["evaluate"]["info"]["run_id"]
        files = {f["path"] for f in api(base, f"/api/2.0/mlflow/artifacts/list?run_id={ev}")["files"]}
        assert {"eval.json", "eval.txt", "samples.txt"} <= files
        metrics = {m["key"]: m["value"] for m in by_name["evaluate"]["data"]["metrics"]}
        assert metrics["unigram_bpb"] > 0 and metrics["val_bpb"] > 0
        assert 0 <= metrics["parse_rate"] <= 1  # the code-aware metric reaches MLflow
        assert "parse rate" in r.stdout  # and the summary table, beside bpb
        mv = api(base, "/api/2.0/mlflow/registered-models/alias?name=gptcore-pretrained&alias=champion")
        assert mv["model_version"]["version"] == "1"

        # a second identical run: every stage a cache hit
        r2 = run_cli("run", REPO / "configs/tiny.yaml", *sets, env={"MLFLOW_TRACKING_URI": base}, timeout=600)
        assert r2.returncode == 0, r2.stderr[-3000:]
        statuses = [line.split()[1] for line in r2.stdout.splitlines()[1:8]]
        assert statuses == ["cached"] * 7, r2.stdout


@contextlib.contextmanager
def prefect_server_with(tmp_path: Path, deployment: str, registered: str):
    """A real `prefect server start` on a free port with `gptcore deploy --name deployment` done;
    yields the environment (PREFECT_API_URL, a store-local MLflow) for workers and CLI runs."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api_url,
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", GPTCORE_PROGRESS="0",
               # the server streams logs to `--watch` only when asked (README, "Running on GPU workers")
               PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true", PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true")
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with started(server_cmd, tmp_path, env, tmp_path / "server.log") as server:
        wait_http(api_url + "/health", timeout=180, proc=server)
        d = subprocess.run([sys.executable, "-m", "gptcore.cli", "deploy", "--name", deployment], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
        assert d.returncode == 0, d.stderr[-3000:]
        assert registered in d.stdout
        yield env


def test_deployment_round_trip_on_a_real_prefect_server(tmp_path):
    with prefect_server_with(tmp_path, "tiny-nightly", "deployment gptcore-pipeline/tiny-nightly -> pool cpu") as env:
        worker_cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "cpu"]
        with started(worker_cmd, tmp_path, env, tmp_path / "worker.log"):
            overrides = [*TINY, f"tracking.result_store={tmp_path}/store"]
            run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "gptcore-pipeline/tiny-nightly",
                                  "--param", f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "600"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=700)
            log = (tmp_path / "worker.log").read_text()[-3000:]
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + log
            assert "Completed" in run.stdout + run.stderr
            assert "pretrain: step " in run.stdout + run.stderr  # --watch shows the sub-flow's progress lines

    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}
    assert runs["pipeline"].info.status == "FINISHED"
    assert runs["pipeline"].data.tags["gptcore.config_path"] == "configs/tiny.yaml"
    assert len(runs["pipeline"].data.tags["prefect.flow_run_id"]) == 36
    assert c.get_model_version_by_alias("gptcore-finetuned", "candidate") is not None
    assert (tmp_path / "store" / "artifacts" / "pretrain").is_dir()


def test_two_nodes_through_prefect_train_what_one_node_with_two_ranks_trains(tmp_path):
    """Multi-node: the pretrain stage fans out one `gptcore-node/gpu-node` deployment run per node; two
    process workers (two "machines") each run torchrun for their node on loopback, one gloo rank each."""
    from gptcore.fileio import sha256_file

    rdzv = free_port()
    store = tmp_path / "store"
    sets = [*TINY, "train.max_steps=6", f"tracking.result_store={store}"]
    with prefect_server_with(tmp_path, "gpu-node", "deployment gptcore-node/gpu-node -> pool gpu") as env:
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", "gpu"]
        with started(worker, tmp_path, env, tmp_path / "worker0.log"), started(worker, tmp_path, env, tmp_path / "worker1.log"):
            two_nodes = [*sets, "train.nnodes=2", "train.nproc_per_node=1", f"train.rdzv_endpoint=127.0.0.1:{rdzv}"]
            r = subprocess.run([sys.executable, "-m", "gptcore.cli", "run", str(REPO / "configs/tiny.yaml"), "--until", "pretrain",
                                *[a for s in two_nodes for a in ("--set", s)]], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=900)
            logs = "".join((tmp_path / f"worker{i}.log").read_text()[-1500:] for i in (0, 1))
            assert r.returncode == 0, r.stderr[-3000:] + logs
        one_node = [*sets, "train.nproc_per_node=2"]
        r2 = subprocess.run([sys.executable, "-m", "gptcore.cli", "run", str(REPO / "configs/tiny.yaml"), "--until", "pretrain",
                             *[a for s in one_node for a in ("--set", s)]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
        assert r2.returncode == 0, r2.stderr[-3000:]

    models = sorted((store / "artifacts" / "pretrain").iterdir(), key=os.path.getmtime)
    assert len(models) == 2
    assert sha256_file(models[0] / "model.safetensors") == sha256_file(models[1] / "model.safetensors")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("tiny")
    pre = c.search_runs([exp.experiment_id], filter_string="tags.`gptcore.stage` = 'pretrain'", order_by=["attribute.start_time ASC"])
    assert [(x.data.params["world_size"], x.data.params["nnodes"]) for x in pre] == [("2", "2"), ("2", "1")]
    assert abs(pre[0].data.metrics["val_bpb"] - pre[1].data.metrics["val_bpb"]) < 1e-6
