"""Many ranks through torchrun (gptcore/training/launch.py), as `gptcore pretrain/finetune` runs them.

- 2 gloo ranks × batch 2 train exactly what 1 process × batch 4 trains (the same global batch).
- Fine-tuning runs on 2 ranks too (DDP over the LoRA weights) and writes its outputs once.
- A rank killed with SIGKILL fails the command with one line naming the rank; running the same
  command again resumes from the newest checkpoint and ends bit-identical to an uninterrupted run.
- Asking for more processes than the machine has is one clear error naming the key and the count.
- No process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gptcore.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
CFG = """\
data: {max_bytes: 200000, num_proc: 1, val_fraction: 0.1, shard_tokens: 50000}
tokenizer: {vocab_size: 300}
model: {n_layer: 1, n_head: 2, n_embd: 64, block_size: 256}
train: {max_steps: 8, batch_size: 4, block_size: 64, eval_every: 4, eval_batches: 2, num_threads: 1, ckpt_every: 4}
finetune: {max_steps: 3, max_examples: 40, batch_size: 2, eval_batches: 1, num_samples: 1}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gptcore.config import load_config
    from gptcore.data.sharding import prepare

    d = tmp_path_factory.mktemp("launch")
    (d / "cfg.yaml").write_text(CFG)
    prepare(load_config(d / "cfg.yaml"), d / "data")
    return d


def _workers(under: Path) -> list[psutil.Process]:
    """Ranks of runs whose files are under `under` (other runs on the machine are not ours to count)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "gptcore.training.worker" in cmd and any(str(under) in a for a in cmd):
            out.append(p)
    return out


def _cli(*args, cwd, timeout=600):
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gptcore.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_ranks_train_what_one_process_trains(setup):
    one = _cli("pretrain", "cfg.yaml", "--data", "data", "--out", "one", cwd=setup)
    two = _cli("pretrain", "cfg.yaml", "--data", "data", "--out", "two", "--set", "train.nproc_per_node=2",
               "--set", "train.batch_size=2", cwd=setup)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    rows = {name: [json.loads(x) for x in (setup / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two")}
    ev1, ev2 = ([r for r in rows[n] if "val_bpb" in r] for n in ("one", "two"))
    assert [r["step"] for r in ev1] == [r["step"] for r in ev2] == [4, 8]
    assert abs(ev1[-1]["val_bpb"] - ev2[-1]["val_bpb"]) < 0.01
    assert abs(ev1[-1]["val_bpb"] - ev2[-1]["val_bpb"]) < 1e-4  # in fact the same numbers, up to reduction order
    summary = json.loads((setup / "two" / ".launch" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    assert not _workers(setup)

    tuned = _cli("finetune", "cfg.yaml", "--base", "two/final", "--out", "ft", "--set", "train.nproc_per_node=2", cwd=setup)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    s = json.loads((setup / "ft" / ".launch" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["val_loss_after"] < s["val_loss_before"]
    assert (setup / "ft" / "final" / "model.safetensors").is_file() and (setup / "ft" / "adapter").is_dir()
    assert not _workers(setup)


def test_too_many_processes_is_one_clear_error(setup):
    r = _cli("pretrain", "cfg.yaml", "--data", "data", "--out", "x", "--set", f"train.nproc_per_node={os.cpu_count() + 1}",
             cwd=setup)
    assert r.returncode == 2 and r.stderr.startswith("error: train.nproc_per_node=") and "Traceback" not in r.stderr
    assert str(os.cpu_count()) in r.stderr


@pytest.mark.slow
def test_a_killed_rank_fails_clearly_and_the_rerun_resumes_bit_exact(setup):
    sets = ["--set", "train.nproc_per_node=2", "--set", "train.batch_size=2", "--set", "train.max_steps=300",
            "--set", "train.ckpt_every=20", "--set", "train.eval_every=100", "--set", "train.log_every=5"]
    ref = _cli("pretrain", "cfg.yaml", "--data", "data", "--out", "ref", *sets, cwd=setup)
    assert ref.returncode == 0, ref.stderr[-2000:]
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gptcore.cli", "pretrain", "cfg.yaml", "--data", "data", "--out", "run", *sets],
                            cwd=setup, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = setup / "run" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(x).get("step", 0) >= 50 for x in metrics.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.05)
    rank1 = [p for p in _workers(setup) if p.environ().get("RANK") == "1"]
    assert rank1, "the run finished before a rank could be killed: make it longer"
    rank1[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: pretrain failed on 2 processes: rank 1 was killed by SIGKILL"), err[-2000:]
    assert "Traceback" not in err
    time.sleep(1)
    assert not _workers(setup), "a rank outlived the failed command"

    again = _cli("pretrain", "cfg.yaml", "--data", "data", "--out", "run", *sets, cwd=setup)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sha256_file(setup / "run" / "final" / "model.safetensors") == sha256_file(setup / "ref" / "final" / "model.safetensors")
    got = [(r["step"], r.get("loss")) for r in map(json.loads, metrics.read_text().splitlines())]
    want = [(r["step"], r.get("loss")) for r in map(json.loads, (setup / "ref" / "metrics.jsonl").read_text().splitlines())]
    assert got == want


@pytest.mark.slow
def test_full_finetune_under_fsdp2_on_two_ranks_resumes_bit_exact(setup):
    """finetune.method=full with train.fsdp=on: FSDP2 over 2 gloo ranks; a rank killed after a checkpoint;
    the same command again resumes and ends bit-identical to an uninterrupted run."""
    base = _cli("pretrain", "cfg.yaml", "--data", "data", "--out", "base", cwd=setup)
    assert base.returncode == 0, base.stderr[-2000:]
    sets = ["--set", "train.nproc_per_node=2", "--set", "finetune.method=full", "--set", "train.fsdp=on",
            "--set", "finetune.max_steps=60", "--set", "finetune.ckpt_every=10", "--set", "finetune.eval_every=100",
            "--set", "finetune.log_every=2"]
    ref = _cli("finetune", "cfg.yaml", "--base", "base/final", "--out", "ref-ft", *sets, cwd=setup)
    assert ref.returncode == 0, ref.stderr[-2000:]
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gptcore.cli", "finetune", "cfg.yaml", "--base", "base/final", "--out", "ft",
                             *sets], cwd=setup, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (setup / "ft" / "checkpoints" / "step_000010").is_dir():
        time.sleep(0.05)
    rank1 = [p for p in _workers(setup / "ft") if p.environ().get("RANK") == "1"]
    assert rank1, "the run finished before a rank could be killed"
    rank1[0].kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "rank 1 was killed by SIGKILL" in err, err[-2000:]
    again = _cli("finetune", "cfg.yaml", "--base", "base/final", "--out", "ft", *sets, cwd=setup)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sha256_file(setup / "ft" / "final" / "model.safetensors") == sha256_file(setup / "ref-ft" / "final" / "model.safetensors")


def test_torchrun_of_the_cli_prints_the_summary_once(setup):
    """`torchrun --nproc_per_node 2 -m gptcore.cli pretrain ...` (docs/03): every rank runs the CLI,
    rank 0 alone prints the summary."""
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "gptcore.cli", "pretrain", "cfg.yaml", "--data", "data", "--out", "tr",
                        "--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "train.batch_size=2"],
                       cwd=setup, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split()[:2] for line in r.stdout.splitlines() if line.startswith("step ")] == [["step", "2"]], r.stdout
    assert sum(line.startswith("model: ") for line in r.stdout.splitlines()) == 1, r.stdout
