"""The 1.5B path runs here, on CPU, with nothing downloaded (slow: minutes, several GB of memory).

1. GPT-2 XL (exactly 1,557,611,200 parameters), random init in bf16, LoRA, 2 optimizer steps at
   context 128 through `gptcore.finetuning.finetune`: the measured peak RSS of that process agrees
   with `gptcore plan --finetune --gpu cpu` within 25%.
2. A 48-layer, 25-head, narrow model (GPT-2 XL's shape at a tiny width) pre-trained with FSDP2 over
   2 gloo ranks, one rank killed after a checkpoint, resumed: bit-identical to an uninterrupted run.

`benchmarks/xl_cpu.py` prints the same figures for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

XL_FT = """\
finetune: {max_steps: 2, batch_size: 1, max_len: 128, eval_batches: 1, num_samples: 0, max_examples: 24,
           log_every: 1, ckpt_every: 2, eval_every: 2, base_dtype: bfloat16}
train: {dtype: bfloat16, num_threads: 2, progress: false}
"""

DRIVER = r"""
import json, resource, sys
from gptcore.config import load_config
from gptcore.finetuning.finetune import finetune

peak = {}
def at_step(event, row):
    if event == "log" and row["step"] == 2:  # after both optimizer steps, before the outputs are written
        peak["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
s = finetune(load_config(sys.argv[1]), sys.argv[2], sys.argv[3], callbacks=[at_step])
json.dump({**peak, "trainable": s["trainable_params"], "total": s["total_params"], "step": s["step"],
           "val_loss_before": s["val_loss_before"], "val_loss_after": s["val_loss_after"]}, open(sys.argv[4], "w"))
"""

BUILD = r"""
import sys, torch
from gptcore.model import GPTConfig, build_model, save_model
from gptcore.tokenizer import gpt2_tokenizer
torch.manual_seed(0)
m = build_model(GPTConfig.preset("gpt2-xl"), dtype=torch.bfloat16)
assert m.num_params() == 1_557_611_200, m.num_params()
save_model(m, gpt2_tokenizer(), sys.argv[1])
"""


def _py(code: str, *args, cwd: Path, timeout: int = 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(5400)
def test_gpt2_xl_lora_two_steps_on_cpu_agree_with_the_plan(tmp_path):
    from gptcore.config import load_config
    from gptcore.training.plan import plan_finetune

    r = _py(BUILD, tmp_path / "xl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "ft.yaml").write_text(XL_FT + "model: {preset: gpt2-xl}\ntokenizer: {path: gpt2}\n")
    r = _py(DRIVER, tmp_path / "ft.yaml", tmp_path / "xl", tmp_path / "ft", tmp_path / "got.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["step"] == 2 and got["total"] > 1_557_611_200  # + the LoRA numbers
    est = plan_finetune(load_config(tmp_path / "ft.yaml"), gpu="cpu")
    measured, planned = got["rss_bytes"], est["memory_gib"]["total"] * 2**30
    print(f"XL LoRA on CPU: peak RSS {measured / 2**30:.2f} GiB, plan {planned / 2**30:.2f} GiB")
    assert abs(measured - planned) <= 0.25 * planned, (measured / 2**30, planned / 2**30, est["memory_gib"])


XL_SHAPED = """\
data: {max_bytes: 150000, num_proc: 1, val_fraction: 0.1, shard_tokens: 50000}
tokenizer: {vocab_size: 300}
model: {n_layer: 48, n_head: 25, n_embd: 100, block_size: 64}
train: {batch_size: 2, eval_every: 3, eval_batches: 1, num_threads: 1, ckpt_every: 3, fsdp: "on", nproc_per_node: 2,
        progress: false}
"""


@pytest.mark.timeout(3600)
def test_xl_shaped_fsdp2_on_two_ranks_resumes_bit_exact_after_a_killed_rank(tmp_path):
    from gptcore.config import load_config
    from gptcore.data.sharding import prepare

    (tmp_path / "cfg.yaml").write_text(XL_SHAPED)
    prepare(load_config(tmp_path / "cfg.yaml"), tmp_path / "data")
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "PYTHONPATH": str(REPO)}

    def pretrain(out: str, steps: int):
        r = subprocess.run([sys.executable, "-m", "gptcore.cli", "pretrain", "cfg.yaml", "--data", "data", "--out", out,
                            "--set", f"train.max_steps={steps}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / out / ".launch" / "summary.json").read_text())

    whole = pretrain("whole", 8)
    assert whole["world_size"] == 2 and whole["params"] > 5_000_000

    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "gptcore.cli", "pretrain", "cfg.yaml", "--data", "data", "--out", "split",
                             "--set", "train.max_steps=8"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1200
    while proc.poll() is None and time.time() < deadline and not (tmp_path / "split/checkpoints/step_000003").is_dir():
        time.sleep(0.1)
    ranks = [p for p in psutil.process_iter(["cmdline"]) if "gptcore.training.worker" in (p.info["cmdline"] or [])
             and p.environ().get("RANK") == "1"]
    assert ranks, "the run ended before a rank could be killed"
    ranks[0].kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "rank 1 was killed by SIGKILL" in err, err[-2000:]
    rest = pretrain("split", 8)  # resumes from the newest sharded-then-gathered checkpoint
    assert rest["resumed_from_step"] in (3, 6)
    assert sha256_file(tmp_path / "split" / "final" / "model.safetensors") == \
        sha256_file(tmp_path / "whole" / "final" / "model.safetensors")
