"""Pre-training speed on this machine, side by side:

    loop      gptcore.training.pretrain.pretrain (shard loader, lr schedule, clipping, NaN guard, metrics, progress)
    bare      the same model and optimizer stepping on one fixed batch in a 6-line loop
    hf        transformers' GPT2LMHeadModel of the same shape, same AdamW, same bare loop

    floor     the weight GEMMs of one step alone (forward and both backward products of every
              nn.Linear): no float32 step is faster, so floor / hf is the ceiling of any speed-up over HF

Reports tokens/s, loop overhead (loop vs bare, target ≤ 3%), ours vs HF, and CPU MFU against the
measured fp32 matmul peak of this machine. The three are measured in turn, `--rounds` times, and
the fastest 5-step window of each is kept (the machine may be shared). One thread by default: less
sensitive to other processes. `--compile 1` (default) adds torch.compile(ours) and its break-even
step count including the compilation: what `train.compile: auto` is decided by on CPU.
Run: .venv/bin/python benchmarks/train.py [--steps 25] [--rounds 4] [--threads 1] [--compile 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTCORE_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import fresh_inductor_cache  # noqa: E402

fresh_inductor_cache()
import torch  # noqa: E402

from gptcore.config import config_from_dict  # noqa: E402

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)


def make_config(steps: int, threads: int):
    return config_from_dict({
        "data": {"max_bytes": 1_000_000, "val_fraction": 0.02, "num_proc": 1},
        "tokenizer": {"vocab_size": 2048},
        "model": {"preset": "tiny", **SHAPE},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "log_every": 5,
                  "eval_every": 10_000, "ckpt_every": 10_000, "eval_batches": 1, "num_threads": threads, "progress": False},
    })


def best_window(rates: list[float]) -> float:
    """The fastest 5-step window after the first (warm-up) one: on a shared machine the least
    disturbed window is the best estimate of what the code itself costs."""
    return max(rates[1:])


def bare_loop(model, steps: int, x, y, log_every: int = 5) -> float:
    from gptcore.training.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-3)
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0:
            now = time.perf_counter()
            rates.append(log_every * x.numel() / (now - t0))
            t0 = now
    return best_window(rates)


def gemm_floor(model, tokens: int, reps: int = 5) -> float:
    """Tokens/s if a training step did nothing but its weight matmuls: for every nn.Linear (the tied head
    included), forward x·Wᵀ, backward dY·W and dYᵀ·x on `tokens` rows, at this thread count. Attention,
    the loss, elementwise ops and the optimizer are left out, so no float32 step can beat it: HF's
    rate over it bounds any model-side speed-up."""
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    mats = [(torch.randn(tokens, i), torch.randn(o, i), torch.randn(tokens, o)) for o, i in shapes]

    def gemms():
        for x, w, dy in mats:
            x @ w.t(), dy @ w, dy.t() @ x

    gemms()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        gemms()
        best = min(best, time.perf_counter() - t)
    return tokens / best


def hf_model(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=SHAPE["block_size"], n_embd=SHAPE["n_embd"], n_layer=SHAPE["n_layer"],
                     n_head=SHAPE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return GPT2LMHeadModel(cfg).train()


def hf_step_loop(model, steps, x, y):
    from gptcore.training.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-3)
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(input_ids=x, labels=x).loss  # HF shifts labels itself; same B·T forward/backward work
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0:
            now = time.perf_counter()
            rates.append(5 * x.numel() / (now - t0))
            t0 = now
    return best_window(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", type=int, default=1, help="also time torch.compile(ours) and its break-even (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gptcore.data.sharding import ShardLoader, prepare
    from gptcore.metrics import read_metrics
    from gptcore.model.gpt import GPTConfig, build_model
    from gptcore.training.plan import cpu_peak_flops
    from gptcore.training.pretrain import pretrain

    cfg = make_config(args.steps, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(cfg, data, progress=False)
        vocab = ShardLoader(data, "train", 8, SHAPE["block_size"]).manifest["vocab_size"]
        x, y = ShardLoader(data, "train", 8, SHAPE["block_size"], seed=1).next_batch()
        gcfg = GPTConfig.preset("tiny", vocab_size=vocab, **SHAPE)
        best = {"loop": 0.0, "bare": 0.0, "hf": 0.0, "compiled": 0.0}
        compiled = None
        if args.compile:  # torch.compile (inductor, CPU): the first step pays the compilation
            torch.manual_seed(cfg.run.seed)
            compiled = build_model(gcfg).train()
            compiled.compile()
            t0 = time.perf_counter()
            _, loss = compiled(x, y)
            loss.backward()  # forward and backward graphs both compile here
            compile_s = time.perf_counter() - t0
            compiled.zero_grad(set_to_none=True)
        for r in range(args.rounds):
            out = Path(tmp) / f"run{r}"
            pretrain(cfg, data, out)
            best["loop"] = max(best["loop"], best_window([r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]))
            torch.manual_seed(cfg.run.seed)
            best["bare"] = max(best["bare"], bare_loop(build_model(gcfg).train(), args.steps, x, y))
            best["hf"] = max(best["hf"], hf_step_loop(hf_model(vocab), args.steps, x, y))
            if compiled is not None:
                best["compiled"] = max(best["compiled"], bare_loop(compiled, args.steps, x, y))
        model = build_model(gcfg)
        floor = gemm_floor(model, x.numel())
        peak = cpu_peak_flops()
        fpt = model.flops_per_token(SHAPE["block_size"])

    print(f"model: {model.num_params() / 1e6:.2f} M params ({SHAPE}, vocab {vocab}), batch 8 × {SHAPE['block_size']}, "
          f"{args.threads} threads, fp32, CPU")
    print(f"CPU peak (measured fp32 1024² matmul): {peak / 1e9:.1f} GFLOP/s\n")
    print("| setup | tokens/s | vs bare step | MFU (CPU) |")
    print("|---|---:|---:|---:|")
    rows = [("bare", "bare model step (ours)"), ("loop", "gptcore pretrain loop"), ("hf", "HF GPT2LMHeadModel, same AdamW")]
    if compiled is not None:
        rows.append(("compiled", "bare model step, torch.compile (inductor)"))
    for name, label in rows:
        tps = best[name]
        print(f"| {label} | {tps:,.0f} | {tps / best['bare']:.3f} | {fpt * tps / peak:.1%} |")
    print(f"| the weight GEMMs alone (the floor: no attention, loss, elementwise or optimizer) | {floor:,.0f} | "
          f"{floor / best['bare']:.3f} | {fpt * floor / peak:.1%} |")
    ratio = best["bare"] / best["hf"]
    print(f"\nloop overhead: {1 - best['loop'] / best['bare']:+.1%} (target ≤ 3%)   ours vs HF: {ratio:.2f}×   "
          f"load average {os.getloadavg()[0]:.1f}")
    from _cli import summary

    summary("train", "pretrain loop overhead vs the bare step", f"{1 - best['loop'] / best['bare']:+.1%}")
    summary("train", f"training step vs HF GPT2LMHeadModel eager, same fused AdamW, {args.threads} thread(s)",
            f"{ratio:.2f}x (MFU {fpt * best['bare'] / peak:.0%} vs HF {fpt * best['hf'] / peak:.0%})")
    summary("train", "training step ceiling: the weight GEMMs alone vs HF eager", f"{floor / best['hf']:.2f}x "
            f"(ours at {100 * best['bare'] / floor:.0f}% of it)")
    if compiled is not None:
        tokens = 8 * SHAPE["block_size"]
        saved = tokens / best["bare"] - tokens / best["compiled"]  # seconds per step
        even = f"break-even after {compile_s / saved:,.0f} steps" if saved > 0 else "never breaks even"
        print(f"torch.compile: first step (compilation) {compile_s:.1f} s; compiled / eager {best['compiled'] / best['bare']:.3f}; {even}")
        summary("train", "torch.compile on CPU: compile time, speed-up, break-even",
                f"{compile_s:.0f} s, {best['compiled'] / best['bare']:.2f}x, {even}")


if __name__ == "__main__":
    main()
