"""Our GPT vs transformers' GPT2LMHeadModel, side by side, same weights, same threads.

    .venv/bin/python benchmarks/model.py [--threads 2] [--steps 2] [--rounds 3] [--compile]

Config: 4 layers, 4 heads, 256 wide, vocab 8192, context 256; training batch 8 x 256 tokens.
  * training step (forward + backward + AdamW), tokens/s: ours (sdpa) vs HF eager (and HF sdpa)
  * greedy KV-cache generation, new tokens/s: ours `generate(temperature=0)` vs HF `generate(do_sample=False)`,
    checked token-identical
  * the decode floor: new tokens/s of the weight matrix-vector products alone, the ceiling of any
    float32 decoder of these weights (its ratio to HF is the most any speed-up can reach)
  * MFU of our training step against a measured float32 matmul peak (PaLM's 6N + 12·L·H·Q·T FLOPs/token)
Timings alternate between the two models in rounds and report the median, so load from other
processes hits both alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import fresh_inductor_cache  # noqa: E402

fresh_inductor_cache()
import torch  # noqa: E402


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    """Measured float32 FLOP/s of a square matmul: the practical peak MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def matvec_floor(model, n: int, reps: int = 3) -> float:
    """New tokens/s if a decode step did nothing but its weight matrix-vector products: every
    nn.Linear of `model` (the tied head included) once per token on a (1, in) row, same threads.
    No decoder of these weights in float32 can beat it; HF's rate over it bounds any speed-up."""
    layers = [(m.weight, m.bias) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = [torch.randn(1, w.shape[1]) for w, _ in layers]
    linear = torch.nn.functional.linear

    def one_token():
        for (w, b), x in zip(layers, rows):
            linear(x, w, b)

    with torch.no_grad():
        one_token()
        return n / min(timed(one_token, n) * n for _ in range(reps))


def train_step_fn(model, forward_loss, lr=1e-4):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=True)

    def step(x, y):
        loss = forward_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def timed(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--compile-decode", type=int, default=1, help="also time generation with compile_decode (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from gptcore.convert.hf import save_hf_gpt2
    from gptcore.model.gpt import GPTConfig, build_model

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256)
    ours = build_model(cfg)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"gptcore-bench-{os.getpid()}"
    save_hf_gpt2(ours, tmp)  # same weights in both
    hf = {impl: transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation=impl) for impl in ("eager", "sdpa")}
    for m in hf.values():
        m.config.resid_pdrop = m.config.embd_pdrop = m.config.attn_pdrop = 0.0
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0

    B, T = 8, 256
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.roll(x, -1, 1)
    with torch.no_grad():
        diff = (ours.eval()(x[:2])[0] - hf["eager"].eval()(x[:2]).logits).abs().max().item()
    ours.train(), [m.train() for m in hf.values()]

    def hf_loss(m):  # the same loss as ours: mean cross-entropy of next-token logits
        return lambda a, b: torch.nn.functional.cross_entropy(m(a).logits.view(-1, cfg.vocab_size), b.view(-1))

    steps = {
        "ours (sdpa)": train_step_fn(ours, lambda a, b: ours(a, b)[1]),
        "HF eager": train_step_fn(hf["eager"], hf_loss(hf["eager"])),
        "HF sdpa": train_step_fn(hf["sdpa"], hf_loss(hf["sdpa"])),
    }
    if args.compile:
        compiled = torch.compile(ours)
        steps["ours (sdpa, compiled)"] = train_step_fn(ours, lambda a, b: compiled(a, b)[1])
    for fn in steps.values():  # warm up (and compile)
        fn(x, y), fn(x, y)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            times[k].append(timed(lambda: fn(x, y), args.steps))
    train_tps = {k: B * T / statistics.median(v) for k, v in times.items()}

    # greedy generation with the KV cache: batch 1, 16-token prompt
    ours.eval(), hf["sdpa"].eval(), hf["eager"].eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    n = args.new_tokens
    gens = {
        "ours": lambda: ours.generate(prompt, n, temperature=0),
        "HF eager": lambda: hf["eager"].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                                 min_new_tokens=n, do_sample=False, pad_token_id=0),
        "HF sdpa": lambda: hf["sdpa"].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                               min_new_tokens=n, do_sample=False, pad_token_id=0),
    }
    compile_s = None
    if args.compile_decode:  # a second copy whose static decode step goes through torch.compile
        import copy

        ours_c = copy.deepcopy(ours)
        ours_c.compile_decode()
        t0 = time.perf_counter()
        ours_c.generate(prompt, 2, temperature=0)  # the first decode step compiles
        compile_s = time.perf_counter() - t0
        gens["ours, compiled decode"] = lambda: ours_c.generate(prompt, n, temperature=0)
    outs = {k: fn() for k, fn in gens.items()}  # warm up, and the tokens to compare
    identical = all(torch.equal(outs["ours"], o) for o in outs.values())
    gtimes = {k: [] for k in gens}
    with torch.no_grad():
        for _ in range(args.rounds):
            for k, fn in gens.items():
                gtimes[k].append(timed(fn, 1))
    gen_tps = {k: n / statistics.median(v) for k, v in gtimes.items()}

    floor_tps = matvec_floor(ours, n)
    peak = matmul_peak()
    mfu = ours.mfu(train_tps["ours (sdpa)"], peak, seq_len=T)

    print(f"## model: ours vs transformers {transformers.__version__} GPT2LMHeadModel "
          f"(torch {torch.__version__}, {args.threads} threads)\n")
    print(f"config 4L/4H/256d, vocab 8192, ctx 256; train batch {B}x{T}; max |logit diff| vs HF = {diff:.2e}\n")
    print("| measurement | ours | HF eager | HF sdpa | ours / HF eager | ours / HF sdpa |")
    print("|---|---|---|---|---|---|")
    o = train_tps["ours (sdpa)"]
    print(f"| training step tokens/s | {o:,.0f} | {train_tps['HF eager']:,.0f} | {train_tps['HF sdpa']:,.0f} | "
          f"{o / train_tps['HF eager']:.2f}x | {o / train_tps['HF sdpa']:.2f}x |")
    g = gen_tps["ours"]
    print(f"| greedy KV-cache generation new tokens/s (batch 1, {n} new) | {g:,.0f} | {gen_tps['HF eager']:,.0f} | "
          f"{gen_tps['HF sdpa']:,.0f} | {g / gen_tps['HF eager']:.2f}x | {g / gen_tps['HF sdpa']:.2f}x |")
    print(f"| decode floor: the weight matvecs alone (no attention, no overhead) | {floor_tps:,.0f} | | | "
          f"{floor_tps / gen_tps['HF eager']:.2f}x | {floor_tps / gen_tps['HF sdpa']:.2f}x |")
    if args.compile:
        c = train_tps["ours (sdpa, compiled)"]
        print(f"| training step tokens/s, torch.compile(ours) | {c:,.0f} | | | {c / train_tps['HF eager']:.2f}x | |")
    if compile_s is not None:
        c = gen_tps["ours, compiled decode"]
        saved = 1 / g - 1 / c  # seconds per token
        even = f"break-even after {compile_s / saved:,.0f} new tokens" if saved > 0 else "never breaks even"
        print(f"| greedy generation, compiled decode step (`compile_decode`) | {c:,.0f} | | | {c / gen_tps['HF eager']:.2f}x | "
              f"{c / gen_tps['HF sdpa']:.2f}x |")
        print(f"\ncompile_decode: first step (compilation) {compile_s:.1f} s; {even}")
    print(f"\ngreedy tokens identical to HF generate: {identical}; load average {os.getloadavg()[0]:.1f}")
    from _cli import summary

    if compile_s is not None:
        summary("model", "greedy generation, compiled decode step, vs HF generate",
                f"{c / gen_tps['HF eager']:.2f}x (compile {compile_s:.0f} s, {even})")

    summary("model", "training step vs HF GPT2LMHeadModel eager", f"{o / train_tps['HF eager']:.2f}x (MFU {100 * ours.mfu(o, matmul_peak(), seq_len=T):.0f}%)")
    summary("model", "greedy KV-cache generation vs HF generate (same tokens)", f"{g / gen_tps['HF eager']:.2f}x")
    summary("model", "greedy decode ceiling: weight matvecs alone vs HF generate", f"{floor_tps / gen_tps['HF eager']:.2f}x "
            f"(ours at {100 * g / floor_tps:.0f}% of it)")
    print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s; FLOPs/token (6N + 12·L·H·Q·T, T={T}): "
          f"{ours.flops_per_token(T) / 1e6:.1f} M; our training MFU: {100 * mfu:.1f}%")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
