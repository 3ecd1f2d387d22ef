"""The GPU check, for one CUDA device: run it once when a GPU machine is lent, record what it prints.

    python benchmarks/gpu.py            # ~5-10 minutes on an H100-class GPU; writes benchmarks/results/gpu.md

1. GPT-2 124M training step, bf16 autocast + torch.compile + flash SDPA (fused AdamW): tokens/s and
   MFU against the device's peak dense bf16 FLOP/s (gptcore/training/gpus.json). Target >= 45% on an
   H100-class GPU (llm.c reports about 50%).
2. KV-cache generation, greedy, batch 1: new tokens/s (eager and with a compiled model).
3. GPT-2 XL LoRA (bf16 base, rank 16, context 512, batch 8): peak memory (torch.cuda.max_memory_allocated)
   beside `gptcore plan --finetune`'s estimate for this GPU.
4. A 100-step GPT-2 124M pre-training run through the pipeline (`gptcore run ... --until pretrain`)
   on the builtin corpus (the machine has no internet): wall seconds and the stage's tokens/s.

Nothing is downloaded; every model is randomly initialised. On a machine without CUDA it says so
and exits 1: there is no CPU stand-in for these figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptcore.config import config_from_dict  # noqa: E402
from gptcore.model import GPTConfig, build_model  # noqa: E402
from gptcore.training.engine import train_step  # noqa: E402
from gptcore.training.optim import build_optimizer  # noqa: E402
from gptcore.training.plan import gpu_spec, plan_finetune  # noqa: E402


def _sync_time(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def train_124m(peak: float, batch: int = 16, T: int = 1024, steps: int = 20) -> dict:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(GPTConfig.preset("gpt2"), device="cuda")
    opt = build_optimizer(model, lr=6e-4, device_type="cuda")
    out = {}
    for name, compiled in (("eager", False), ("compile", True)):
        m = torch.compile(model) if compiled else model
        x = torch.randint(0, 50257, (batch, T + 1), device="cuda")
        batches = [(x[:, :-1], x[:, 1:])]
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (and compilation)
            train_step(m, opt, batches, amp_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        dt = _sync_time(lambda: train_step(m, opt, batches, amp_dtype=torch.bfloat16), steps)
        tps = batch * T / dt
        out[name] = {"tokens_per_s": tps, "mfu": model.mfu(tps, peak, T), "step_ms": dt * 1e3, "warmup_s": warm}
    return out


@torch.no_grad()
def generate(new: int = 256) -> dict:
    torch.manual_seed(0)
    model = build_model(GPTConfig.preset("gpt2"), device="cuda", dtype=torch.bfloat16).eval()
    idx = torch.randint(0, 50257, (1, 16), device="cuda")
    out = {}
    for name, m in (("eager", model), ("compile", torch.compile(model))):
        m.generate(idx, 8, temperature=0.0)  # warm-up
        dt = _sync_time(lambda: m.generate(idx, new, temperature=0.0), 3)
        out[name] = new / dt
    return out


def xl_lora_memory(device_name: str) -> dict:
    from gptcore.finetuning.objectives import instruct_loss
    from gptcore.model.lora import apply_lora

    cfg = config_from_dict({"model": {"preset": "gpt2-xl"}, "tokenizer": {"path": "gpt2"},
                            "finetune": {"batch_size": 8, "max_len": 512, "rank": 16, "base_dtype": "bfloat16"}})
    plan = plan_finetune(cfg, gpu=device_name)
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build_model(GPTConfig.preset("gpt2-xl"), device="cuda", dtype=torch.bfloat16)
    apply_lora(model, 16, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    batch = [(list(range(1, 513)), [-100] * 256 + list(range(257, 513)))] * 8
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = instruct_loss(model, batch, 0, torch.device("cuda"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "plan_gib": plan["memory_gib"]["total"]}


def pipeline_100_steps(tmp: Path) -> dict:
    from _cli import cli_env

    env = cli_env(GPTCORE_PROGRESS="0", MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
    sets = ["data.source=python-stdlib", "data.max_bytes=20000000", "train.max_steps=100", "train.eval_every=100",
            "train.ckpt_every=100", f"tracking.result_store={tmp}/store"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "gptcore.cli", "run", str(REPO / "configs/gpt2-124m.yaml"), "--until", "pretrain",
                        *[a for s in sets for a in ("--set", s)]], cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for f in (tmp / "store" / "runs" / "pretrain").glob("*/metrics.jsonl") for x in f.read_text().splitlines()]
    tps = [r_["tokens_per_s"] for r_ in rows if "tokens_per_s" in r_]
    return {"ok": r.returncode == 0, "wall_s": wall, "tokens_per_s": max(tps) if tps else None,
            "tail": (r.stderr or "")[-400:] if r.returncode else ""}


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device; none is visible here (no CPU stand-in for these figures)")
        return 1
    name = torch.cuda.get_device_name(0)
    canon, peak, mem = gpu_spec(name)
    print(f"device: {name} ({canon}: peak {peak / 1e12:.0f} TFLOP/s bf16, {mem} GiB); torch {torch.__version__}")
    rows = []
    t = train_124m(peak)
    for k, v in t.items():
        rows.append((f"GPT-2 124M train step, bf16, {k}", f"{v['tokens_per_s']:,.0f} tok/s, MFU {v['mfu']:.1%}, "
                     f"{v['step_ms']:.0f} ms/step (warm-up {v['warmup_s']:.0f} s)"))
    g = generate()
    rows += [(f"KV-cache greedy generation, {k}", f"{v:,.0f} new tok/s") for k, v in g.items()]
    x = xl_lora_memory(name)
    rows.append(("GPT-2 XL LoRA r16, batch 8 x 512, peak memory", f"{x['peak_gib']:.1f} GiB (plan {x['plan_gib']:.1f} GiB)"))
    import tempfile

    p = pipeline_100_steps(Path(tempfile.mkdtemp(prefix="gpu_pipeline_")))
    rows.append(("pipeline: GPT-2 124M, 100 steps (gptcore run --until pretrain)",
                 f"{'ok' if p['ok'] else 'FAILED'}, {p['wall_s']:.0f} s wall, best {p['tokens_per_s'] or 0:,.0f} tok/s {p['tail']}"))
    w = max(len(a) for a, _ in rows)
    table = "\n".join(f"| {a:<{w}} | {b} |" for a, b in rows)
    print(table)
    out = REPO / "benchmarks" / "results" / "gpu.md"
    out.write_text(f"# GPU check on {name}\n\nCommand: `python benchmarks/gpu.py` ({time.strftime('%Y-%m-%d')})\n\n"
                   f"| what | figure |\n|---|---|\n{table}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
