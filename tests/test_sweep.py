"""`gptcore sweep`: grid × seeds as child pipeline runs, shared stages computed once, the comparison in
MLflow, a failed cell reported and recomputed alone on a rerun.

The gptcore functions are the counting stand-ins of tests/pipeline_fakes.py (val bpb = 1 / train.lr),
and the cells run one at a time in this process (--max-parallel 1), so the stand-ins see every call.
The parallel path (cells in worker processes) runs for real in test_sweep_parallel_real (slow).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_fakes  # noqa: E402
from test_pipeline import TINY, prefect_server, shared_mlflow  # noqa: E402,F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep_in(prefect_server, shared_mlflow, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_mlflow)
    (tmp_path / "c.yaml").write_text("run: {name: sweep-test, seed: 7}\n")
    calls = pipeline_fakes.install(monkeypatch)
    from flows.sweep import run_sweep

    def run(**kw):
        return run_sweep("c.yaml", {"train.lr": ["0.001", "0.002"]}, 2, [*TINY, *kw.pop("sets", [])], 1, quiet=False, **kw)

    return run, calls, monkeypatch


def test_sweep_children_table_plot_shared_stages_and_rerun(sweep_in, shared_mlflow):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from flows.sweep import format_table

    run, calls, monkeypatch = sweep_in
    real = pipeline_fakes.pretrain

    def flaky(config, *a, **k):  # one cell fails: the others still finish
        if config.train.lr == 0.002 and config.run.seed == 8:
            raise RuntimeError("worker lost")
        return real(config, *a, **k)

    monkeypatch.setattr("gptcore.training.pretrain.pretrain", flaky)
    first = run()
    assert [(c["variant"], c["seed"], "error" in c) for c in first["cells"]] == [
        ("train.lr=0.001", 7, False), ("train.lr=0.001", 8, False), ("train.lr=0.002", 7, False),
        ("train.lr=0.002", 8, True)]
    assert calls["download"] == calls["train_tokenizer"] == calls["shard"] == 1  # shared by all cells
    assert calls["pretrain"] == 3  # the failed cell raised before the stand-in counted it
    rows = {r["variant"]: r for r in first["table"]}
    assert rows["train.lr=0.001"]["val_bpb"][0] == pytest.approx(1000.0) and rows["train.lr=0.001"]["n"] == 2
    assert rows["train.lr=0.002"]["n"] == 1 and rows["train.lr=0.002"]["failed"] == 1
    assert "(ref)" in format_table(first["table"])

    c = MlflowClient(shared_mlflow)
    sweep = c.get_run(first["run_id"])
    assert sweep.info.run_name == "sweep" and sweep.info.status == "FAILED"  # not every cell finished
    children = c.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["pipeline"] * 4
    assert {r.info.status for r in children} == {"FINISHED", "FAILED"}
    files = {f.path for f in c.list_artifacts(sweep.info.run_id)}
    assert {"table.md", "cells.md", "val_bpb.png"} <= files
    table_md = Path(c.download_artifacts(sweep.info.run_id, "table.md", str(Path.cwd()))).read_text()
    assert "| train.lr=0.001 | 2 | 1000.0000 ± 0.0000 | (ref) |" in table_md
    png = Path(c.download_artifacts(sweep.info.run_id, "val_bpb.png", str(Path.cwd()))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sweep.data.metrics["train.lr:0.002/val_bpb"] == pytest.approx(500.0)

    # the rerun computes only the missing cell; everything else is a cache hit
    monkeypatch.setattr("gptcore.training.pretrain.pretrain", real)
    second = run()
    assert all("error" not in cell for cell in second["cells"]) and calls["pretrain"] == 4
    statuses = [cell["statuses"] for cell in second["cells"]]
    assert all(s["pretrain"] == "cached" for s in statuses[:3]) and statuses[3]["pretrain"] == "computed"
    assert all(s["train_tokenizer"] == "cached" for s in statuses)
    rows = {r["variant"]: r for r in second["table"]}
    assert rows["train.lr=0.002"]["val_bpb"] == (pytest.approx(500.0), 0.0)
    assert rows["train.lr=0.002"]["val_bpb_p"] == 0.0  # seeds agree exactly and the means differ
    assert c.get_run(second["run_id"]).info.status == "FINISHED"
    third = run()
    assert calls["pretrain"] == 4 and all(s == "cached" for cell in third["cells"]
                                          for st, s in cell["statuses"].items() if st != "register")


def test_sweep_cli_rejects_bad_grids_in_one_line(run_cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {name: bad}\n")
    for grid, msg in [("model.pos", "has no '='"), ("model.pos=learned,wobbly", "bad value 'wobbly' for 'model.pos'"),
                      ("run.seed=1,2", "run.seed cannot be a grid key"), ("nope.x=1,2", "unknown config section")]:
        r = run_cli("sweep", cfg, "--grid", grid, "--seeds", "1")
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and msg in r.stderr, (grid, r.stderr)
        assert "Traceback" not in r.stderr
    r = run_cli("sweep", cfg, "--seeds", "1")
    assert r.returncode == 2 and "no grid" in r.stderr


@pytest.mark.slow
def test_sweep_parallel_real(tmp_path, run_cli):
    """Two cells at once in worker processes on the real engines: tokenizer and shards computed once."""
    sets = ["data.max_bytes=300000", "tokenizer.vocab_size=512", "model.n_layer=1", "model.n_embd=32",
            "train.max_steps=4", "train.eval_every=2", "train.eval_batches=1", "eval.batches=1", "eval.seeds=[0]",
            "finetune.max_steps=2", "finetune.max_examples=20", "finetune.eval_batches=1", "finetune.num_samples=1",
            "data.num_proc=1", "train.progress=false", "train.num_threads=1"]
    args = ["sweep", REPO / "configs/tiny.yaml", "--grid", "model.pos=learned,rope", "--seeds", "1",
            "--max-parallel", "2", *[x for s in sets for x in ("--set", s)]]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    r = run_cli(*args, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.pos=rope" in r.stdout and "(ref)" in r.stdout
    assert r.stderr.count("train_tokenizer: computed") == 1 and r.stderr.count("train_tokenizer: cached") == 1
    r2 = run_cli(*args, env=env, cwd=tmp_path, timeout=900)
    assert r2.returncode == 0 and "computed" not in r2.stderr.replace("register: computed", "")


@pytest.mark.slow
def test_sigterm_stops_a_parallel_sweep_and_its_workers(tmp_path):
    """SIGTERM to `gptcore sweep` while two cells train in worker processes: it exits 143,
    no worker (or anything else it started) outlives it, and the sweep and cell runs are KILLED: each
    worker's own SIGTERM path ended its cell (a SIGKILLed worker would leave its pretrain run RUNNING)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from mlflow.tracking import MlflowClient

    sets = ["data.max_bytes=300000", "tokenizer.vocab_size=512", "model.n_layer=1", "model.n_embd=32",
            "train.max_steps=100000", "train.eval_every=1000", "train.ckpt_every=1000", "data.num_proc=1",
            "train.progress=false", "train.num_threads=1", "run.name=t"]
    args = [sys.executable, "-m", "gptcore.cli", "sweep", str(REPO / "configs/tiny.yaml"), "--grid",
            "model.pos=learned,rope", "--seeds", "1", "--max-parallel", "2", *[x for s in sets for x in ("--set", s)]]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db")
    env.pop("PREFECT_API_URL", None)
    err = tmp_path / "stderr"
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                         start_new_session=True)
    try:
        deadline = time.time() + 600
        while len(list(tmp_path.glob(".gptcore/runs/pretrain/*/metrics.jsonl"))) < 2:  # both cells training
            assert p.poll() is None and time.time() < deadline, err.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2)
        before = psutil.Process(p.pid).children(recursive=True)
        os.kill(p.pid, signal.SIGTERM)  # the parent alone, as `kill PID` or a scheduler does
        try:  # a liveness bound, not a speed: unstopped, the runner's exit waits for 100000 steps
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("hung: the sweep was still running 60 s after SIGTERM")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = err.read_text()
    assert p.returncode == 143, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.splitlines()[-1] == "terminated", text[-3000:]
    _, alive = psutil.wait_procs(before, timeout=5)
    assert not [q for q in alive if q.is_running() and q.status() != psutil.STATUS_ZOMBIE], "a worker outlived the sweep"
    c = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = c.get_experiment_by_name("t")
    status = {}
    for r in c.search_runs([exp.experiment_id]):
        status.setdefault(r.info.run_name, set()).add(r.info.status)
    assert status["sweep"] == {"KILLED"} and status["pretrain"] == {"KILLED"}, status
