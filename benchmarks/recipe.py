"""Time to quality: how much sooner does a modern recipe reach GPT-2's final val bits per byte?

    baseline  configs/tiny-gpt2.yaml — the GPT-2 recipe: learned positions, GELU, LayerNorm, tied head,
              AdamW, cosine schedule (tiny.yaml before issue 15)
    ours      the same file with --ours overrides (default: the combination we found best)
    target    the baseline's final val bpb, averaged over its seeds
    measure   for every run the training seconds until its val bpb first reaches the target (linear
              between evaluations; evaluation time itself is not counted); a baseline seed that ends
              above the target counts its whole time (which flatters the baseline)
    report    mean seconds ours / mean seconds baseline (goal <= 0.5, at least <= 0.8), each recipe's
              final bpb at the same step budget and Welch's p of the difference

Both recipes train on the same shards (the builtin corpus, prepared once), alternately seed by seed
in one process, so machine load falls on both alike; the load average is reported.
Run: .venv/bin/python benchmarks/recipe.py [--seeds 3] [--steps 300] [--threads 2] [--ours "k=v;k=v"]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTCORE_PROGRESS", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import cli_args  # noqa: E402
from gptcore.config import load_config  # noqa: E402

OURS = "model.pos=rope;model.norm=rmsnorm;model.mlp=relu2;train.optimizer=muon;train.lr=5e-3"


def train_curve(cfg, data_dir: Path, out: Path) -> list[tuple[float, int, float]]:
    """Pre-train; [(training seconds so far, step, val bpb)] at every evaluation (eval time excluded)."""
    import gptcore.evaluation.evaluate as ev
    from gptcore.training.pretrain import pretrain

    spent = {"eval": 0.0}
    real = ev.val_metrics

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent["eval"] += time.perf_counter() - t

    curve: list[tuple[float, int, float]] = []
    t0 = time.perf_counter()

    def on_event(event: str, row: dict) -> None:
        if event == "eval":
            curve.append((time.perf_counter() - t0 - spent["eval"], int(row["step"]), float(row["val_bpb"])))

    ev.val_metrics = timed
    try:
        pretrain(cfg, data_dir, out, callbacks=[on_event])
    finally:
        ev.val_metrics = real
    return curve


def time_to(curve: list[tuple[float, int, float]], target: float) -> tuple[float, bool]:
    """Seconds until val bpb <= target (interpolated between evaluations), and whether it got there."""
    prev = (0.0, 0, float("inf"))
    for t, _, bpb in curve:
        if bpb <= target:
            if prev[2] == float("inf"):
                return t, True
            frac = (prev[2] - target) / (prev[2] - bpb)
            return prev[0] + frac * (t - prev[0]), True
        prev = (t, 0, bpb)
    return curve[-1][0], False


def main() -> None:
    args = cli_args(__doc__.splitlines()[0], seeds=3, steps=300, threads=2, eval_every=20,
                    baseline="configs/tiny-gpt2.yaml", ours=OURS, out="benchmarks/results/recipe.md")
    from gptcore.data.sharding import prepare
    from gptcore.evaluation.stats import mean_std, welch_p

    common = [f"train.max_steps={args.steps}", f"train.num_threads={args.threads}", f"train.eval_every={args.eval_every}",
              "train.eval_batches=8", "train.ckpt_every=100000", "train.progress=false", "data.num_proc=1"]
    ours_sets = [s for s in args.ours.split(";") if s]
    load0 = os.getloadavg()
    runs: dict[str, list] = {"baseline": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = load_config(ROOT / args.baseline, common)
        prepare(base, tmp / "data", progress=False)
        for i in range(args.seeds):
            for name, extra in (("baseline", []), ("ours", ours_sets)):
                cfg = load_config(ROOT / args.baseline, [*common, *extra, f"run.seed={base.run.seed + i}"])
                curve = train_curve(cfg, tmp / "data", tmp / f"{name}-{i}")
                runs[name].append(curve)
                print(f"{name} seed {i}: final val bpb {curve[-1][2]:.4f} after {curve[-1][0]:.1f} s", flush=True)
    load1 = os.getloadavg()
    finals = {k: [c[-1][2] for c in v] for k, v in runs.items()}
    target = mean_std(finals["baseline"])[0]
    times = {k: [time_to(c, target) for c in v] for k, v in runs.items()}
    secs = {k: [t for t, _ in v] for k, v in times.items()}
    ratio = mean_std(secs["ours"])[0] / mean_std(secs["baseline"])[0]

    def pm(xs, d=4):
        m, s = mean_std(xs)
        return f"{m:.{d}f} ± {s:.{d}f}"

    report = "\n".join([
        f"# Recipe benchmark: time to the GPT-2 recipe's final val bpb ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"command: `.venv/bin/python benchmarks/recipe.py --seeds {args.seeds} --steps {args.steps} --threads {args.threads}"
        f" --eval-every {args.eval_every}"
        f" --ours \"{args.ours}\"`",
        f"baseline: {args.baseline}; ours: the same + `{' '.join(ours_sets)}`; {args.steps} steps each, "
        f"{args.seeds} seeds, {args.threads} threads, load average {load0[0]:.1f} before, {load1[0]:.1f} after",
        "",
        "| recipe | final val bpb | seconds to target | reached | seconds for all steps |",
        "|---|---:|---:|---:|---:|",
        *(f"| {k} | {pm(finals[k])} | {pm(secs[k], 1)} | {sum(ok for _, ok in times[k])}/{len(times[k])} | "
          f"{pm([c[-1][0] for c in runs[k]], 1)} |" for k in runs),
        "",
        f"target (baseline's mean final val bpb): {target:.4f}",
        f"**time ratio ours / baseline: {ratio:.2f}×** (goal ≤ 0.5×, at least ≤ 0.8×)",
        f"final bpb at the same step budget: ours − baseline = {mean_std(finals['ours'])[0] - target:+.4f}, "
        f"Welch p = {welch_p(finals['ours'], finals['baseline']):.3g}",
        "",
    ])
    print(report)
    from benchmarks._cli import summary

    summary("recipe", f"modern recipe vs GPT-2's, seconds to GPT-2's final val bpb, {args.steps} steps, {args.seeds} seed(s)",
            f"{ratio:.2f}x")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
