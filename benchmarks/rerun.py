"""A cached rerun of `gptcore run`, as a user sees it: the whole process, and where its seconds go.

    .venv/bin/python benchmarks/rerun.py [--config configs/tiny.yaml] [--base DIR] [--rounds 3]

Runs `gptcore run CONFIG` once to fill the cache (in a scratch folder: its own .gptcore/ store and
mlflow.db), then times whole-process cached reruns, every stage a Prefect cache hit. With
`--base DIR` (an export of an older tree, e.g. `git archive 928d932 | tar -x -C DIR`) the same is done
for that tree, interleaved round by round, so both see the same machine load. Per part, each in a
fresh process of each tree:

  imports   `import flows.pipeline` (Prefect, MLflow, and torch where the tree still imports it)
  server    a temporary Prefect server from launch to /health (what Prefect starts without PREFECT_API_URL)
  mlflow    MlflowClient on the sqlite store + the experiment lookup
  stages    the flow's own stage rows (sum of the summary table's seconds)
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARTS = {
    "imports": "import time; t = time.perf_counter(); import flows.pipeline; print(time.perf_counter() - t)",
    "server": ("import time, tasks; from prefect.server.api.server import SubprocessASGIServer; s = SubprocessASGIServer(); "
               "t = time.perf_counter(); s.start(); print(time.perf_counter() - t); s.stop()"),
    "mlflow": ("import time, tasks; from tasks import tracking; t = time.perf_counter(); "
               "c = tracking.client('sqlite:///' + __import__('os').path.abspath('mlflow.db')); "
               "tracking.experiment_id(c, 'bench'); print(time.perf_counter() - t)"),
}


def env_for(tree: Path) -> dict:
    from _cli import cli_env

    env = cli_env(PYTHONPATH=str(tree), GPTCORE_PROGRESS="0")
    env.pop("PREFECT_API_URL", None)
    return env


def run(tree: Path, work: Path, config: Path) -> tuple[float, float, str]:
    """(wall seconds, stage seconds, output) of one `gptcore run` in `work`."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gptcore.cli", "run", str(config)], cwd=work, env=env_for(tree),
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"gptcore run failed in {work}:\n{p.stderr[-3000:]}")
    m = re.search(r"^total\s+([\d.]+)s", p.stdout, re.M)
    return wall, float(m.group(1)) if m else float("nan"), p.stdout


def part(tree: Path, work: Path, code: str) -> float:
    p = subprocess.run([sys.executable, "-c", code], cwd=work, env=env_for(tree), capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"part failed: {code}\n{p.stderr[-2000:]}")
    return float(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    ap.add_argument("--base", default=None, help="an older tree to compare with (before/after)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch folder (kept, so a second call reuses its caches)")
    args = ap.parse_args()
    config = Path(args.config).resolve()
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_rerun_"))
    trees = {"ours": ROOT} | ({"before": Path(args.base).resolve()} if args.base else {})
    works = {}
    for name, tree in trees.items():
        works[name] = root / name
        works[name].mkdir(parents=True, exist_ok=True)
        run(tree, works[name], config)  # fill the cache (a no-op when --work already holds it)
        wall, stages, out = run(tree, works[name], config)
        if "computed" in out.split("stage", 1)[-1].split("total")[0].replace("register", ""):
            sys.exit(f"{name}: the rerun computed a stage; the cache is not warm:\n{out}")
    walls = {n: [] for n in trees}
    stage_s = {n: [] for n in trees}
    parts = {(n, k): [] for n in trees for k in PARTS}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            wall, stages, _ = run(tree, works[name], config)
            walls[name].append(wall)
            stage_s[name].append(stages)
            for k, code in PARTS.items():
                parts[(name, k)].append(part(tree, works[name], code))
    med = statistics.median
    cols = list(trees)
    print(f"config {config.name}, cached rerun (every stage a cache hit); median of {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| part | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for k in PARTS:
        print(f"| {k} (own process) | " + " | ".join(f"{med(parts[(n, k)]):.2f} s" for n in cols) + " |")
    print("| stages (summary table total) | " + " | ".join(f"{med(stage_s[n]):.2f} s" for n in cols) + " |")
    print("| **whole `gptcore run`, wall** | " + " | ".join(f"**{med(walls[n]):.2f} s**" for n in cols) + " |")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _cli import summary

    summary("pipeline", f"cached rerun of `gptcore run {config.name}`, whole process", f"{med(walls['ours']):.2f} s")
    if "before" in trees:
        print(f"\nbefore / after: {med(walls['before']) / med(walls['ours']):.2f}x faster")
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
