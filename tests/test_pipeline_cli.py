"""`gptcore run` as a user meets it: one-line errors for bad input, Ctrl-C/SIGTERM stop cleanly.

Runs that get past config validation use `tests/pipeline_fakes.py` as the program: the real CLI
with the gptcore library functions replaced by quick stand-ins (FAKE_SLEEP makes a stage long),
with its own temporary Prefect server, which must not outlive it. (A damaged input inside a stage
and two concurrent runs are in test_pipeline.py, sharing that module's Prefect server.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAKES = Path(__file__).resolve().parent / "pipeline_fakes.py"
TINY = ["--set", "data.max_bytes=3000", "--set", "train.max_steps=6", "--set", "finetune.max_steps=3"]


def fake_cli(tmp_path, *args, env=None, **kw):
    e = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", **(env or {}))
    # SIGINT default in the child even if this test runs in a background job (where it is ignored)
    return subprocess.Popen([sys.executable, str(FAKES), *map(str, args)], cwd=tmp_path, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "error: config file not found (missing.yaml)"),
    (["cfg.yaml", "--set", "train.lrr=1"], "error: unknown config key 'train.lrr' (cfg.yaml): did you mean 'lr'?"),
    (["cfg.yaml", "--set", "train.max_steps=-3"], "error: bad value -3 for 'train.max_steps'"),
    (["cfg.yaml", "--until", "deploy"], "error: unknown stage 'deploy' (--until): stages: download, train_tokenizer"),
])
def test_bad_input_is_one_error_line(run_cli, tmp_path, args, message):
    (tmp_path / "cfg.yaml").write_text("run: {name: x}\n")
    r = run_cli("run", *args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith(message), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert not (tmp_path / ".gptcore").exists() and not (tmp_path / "mlflow.db").exists()


def _runs(tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("t")
    return {r.info.run_name: r for r in c.search_runs([exp.experiment_id])} if exp else {}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_stops_cleanly_without_orphaned_server(tmp_path, sig, code):
    (tmp_path / "c.yaml").write_text("run: {name: t}\n")
    flag = tmp_path / "sleeping"
    p = fake_cli(tmp_path, "run", "c.yaml", *TINY, env={"FAKE_SLEEP": "pretrain:120", "FAKE_SLEEP_FLAG": str(flag)})
    deadline = time.time() + 240
    while not flag.exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.2)
    servers = _children(p.pid)
    assert servers, "expected the temporary Prefect server as a child process"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "Traceback" not in err
    time.sleep(1)
    for pid in servers:  # the temporary server went down with us
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    runs = _runs(tmp_path)
    assert runs["pipeline"].info.status == "KILLED" and runs["pretrain"].info.status == "KILLED"


def test_editing_library_code_recomputes_the_stages_that_run_it(tmp_path):
    """Cache keys hold the gptcore code each stage runs: an edit to gptcore/training/ (in a copy of the
    tree) recomputes pretrain and what follows, while download, tokenizer and shards stay cache hits."""
    import re
    import shutil

    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "tree"
    for part in ("gptcore", "tasks", "flows", "configs"):
        shutil.copytree(repo / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "tests").mkdir()
    shutil.copy(repo / "tests" / "pipeline_fakes.py", copy / "tests" / "pipeline_fakes.py")
    (tmp_path / "c.yaml").write_text("run: {name: code}\n")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", PYTHONPATH=str(copy))

    def run() -> dict[str, str]:
        r = subprocess.run([sys.executable, str(copy / "tests" / "pipeline_fakes.py"), "run", "c.yaml", *TINY],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return dict(re.findall(r"\[gptcore\] (\w+): (cached|computed)", r.stderr))

    assert set(run().values()) == {"computed"}
    assert set(run().values()) == {"cached"}
    with open(copy / "gptcore" / "training" / "engine.py", "a") as f:
        f.write("\n# an edit to the training engine\n")
    st = run()
    assert (st["download"], st["train_tokenizer"], st["shard"]) == ("cached",) * 3
    assert st["pretrain"] == "computed" and st["finetune"] == "computed"
