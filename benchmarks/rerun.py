"""A cached rerun of `gptcore run`, as a user sees it: the whole process, and where its seconds go.

    .venv/bin/python benchmarks/rerun.py [--config configs/tiny.yaml] [--base DIR] [--rounds 3]

Runs `gptcore run CONFIG` once to fill the cache (in a scratch folder: its own .gptcore/ store and
mlflow.db), then times whole-process cached reruns, every stage a Prefect cache hit. With
`--base DIR` (an export of an older tree, e.g. `git archive f145b00 | tar -x -C DIR`) the same is done
for that tree, interleaved round by round, so both see the same machine load. Per part, each in a
fresh process of each tree:

  imports   `import flows.pipeline` (Prefect, MLflow, and torch where the tree still imports it)
  server    a temporary Prefect server from launch to /health (what Prefect starts without PREFECT_API_URL)
  mlflow    MlflowClient on the sqlite store + the experiment lookup
  stages    the flow's own stage rows (sum of the summary table's seconds)
  running   the whole `gptcore run` with PREFECT_API_URL at a Prefect server that is already up
            (one temporary server, started here, shared by both trees): nothing to start or stop

Then one more rerun of this tree with its timeline on (GPTCORE_TIMELINE, flows/timeline.py): the
critical path of the process part by part, and its Prefect API requests and MLflow calls. The
timeline's instrumentation costs a little; the timed rounds run without it.
Prints markdown tables.
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

# the timeline's critical path: (part, the mark it starts after, the mark it ends at)
TIMELINE = [
    ("python, typer, gptcore.cli; config checks", None, "cli: preflight done"),
    ("imports: Prefect, MLflow (server starting meanwhile)", "cli: preflight done", "imports: flows.pipeline"),
    ("MLflow store open", "imports: flows.pipeline", "mlflow: store open"),
    ("waiting for the server's /health", "mlflow: store open", "server: healthy"),
    ("flow run created (first API calls)", "server: healthy", "flow: pipeline body"),
    ("7 stages, 3 sub-flows, MLflow runs", "flow: pipeline body", "flow: pipeline body done"),
    ("flow run ends", "flow: pipeline body done", "flow: returned"),
    ("drain logs and events, stop the server", "flow: returned", "server: stopped"),
    ("atexit handlers, exit", "server: stopped", "atexit: last handler"),
]


def env_for(tree: Path, **extra: str) -> dict:
    from _cli import cli_env

    env = cli_env(PYTHONPATH=str(tree), GPTCORE_PROGRESS="0")
    env.pop("PREFECT_API_URL", None)
    return {**env, **extra}


def run(tree: Path, work: Path, config: Path, **extra: str) -> tuple[float, float, str]:
    """(wall seconds, stage seconds, output) of one `gptcore run` in `work`."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gptcore.cli", "run", str(config)], cwd=work, env=env_for(tree, **extra),
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


def running_server():
    """A Prefect server that is up before the runs (Prefect's own temporary one, started here)."""
    sys.path.insert(0, str(ROOT))
    import tasks  # noqa: F401  (offline defaults)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server


def timeline(work: Path, config: Path) -> tuple[float, list[tuple[float, str]]]:
    """One rerun of this tree with GPTCORE_TIMELINE on: (wall, [(seconds since start, label)])."""
    log = work / "timeline.log"
    log.unlink(missing_ok=True)
    t0 = time.time()
    wall, _, _ = run(ROOT, work, config, GPTCORE_TIMELINE=str(log), GPTCORE_TIMELINE_T0=repr(t0))
    marks = []
    for line in log.read_text().splitlines():
        t, label = line.split(" ", 1)
        marks.append((float(t), label))
    return wall, marks


def print_timeline(wall: float, marks: list[tuple[float, str]]) -> None:
    def at(prefix: str | None) -> float:
        if prefix is None:
            return 0.0
        return next(t for t, label in marks if label.startswith(prefix))

    print(f"\n### timeline of one cached rerun of this tree (GPTCORE_TIMELINE), {wall:.2f} s wall, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| part (critical path, one after the other) | from | seconds |\n|---|---:|---:|")
    for name, start, end in TIMELINE:
        a, b = at(start), at(end)
        print(f"| {name} | {a:.2f} s | {b - a:.2f} s |")
    print(f"| (process start to exit, outside: {wall:.2f} s wall) | | |")
    if any(label == "server: launched" for _, label in marks):
        print(f"| (beside it: the temporary server, launch to /health answering, at most) | {at('server: launched'):.2f} s "
              f"| {at('server: healthy') - at('server: launched'):.2f} s |")
    api = [label.split() for _, label in marks if label.startswith("api ")]
    ml = [label.split() for _, label in marks if label.startswith("mlflow ") and label.split()[-1][0].isdigit()]
    busy = sum(1 for a in api if a[-1] == "503")
    print(f"\nPrefect API requests: {len(api)}, {sum(float(a[3]) for a in api):.2f} s waiting for answers"
          f" ({busy} answered 503 to the client: Prefect's server's \"database busy\", which flows/server_app.py resends itself first)")
    by_call: dict[str, list[float]] = {}
    for m in ml:
        by_call.setdefault(m[1], []).append(float(m[2]))
    print(f"MLflow client calls: {len(ml)}, {sum(sum(v) for v in by_call.values()):.2f} s: "
          + ", ".join(f"{k} ×{len(v)}" for k, v in sorted(by_call.items(), key=lambda kv: -len(kv[1]))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    ap.add_argument("--base", default=None, help="an older tree to compare with (before/after)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch folder (kept, so a second call reuses its caches)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
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
    running = {n: [] for n in trees}
    parts = {(n, k): [] for n in trees for k in PARTS}
    server = running_server()
    try:
        for _ in range(args.rounds):
            for name, tree in trees.items():
                wall, stages, _ = run(tree, works[name], config)
                walls[name].append(wall)
                stage_s[name].append(stages)
                running[name].append(run(tree, works[name], config, PREFECT_API_URL=server.api_url)[0])
                for k, code in PARTS.items():
                    parts[(name, k)].append(part(tree, works[name], code))
    finally:
        server.stop()
    med = statistics.median
    cols = list(trees)
    print(f"config {config.name}, cached rerun (every stage a cache hit); median of {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| part | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for k in PARTS:
        print(f"| {k} (own process) | " + " | ".join(f"{med(parts[(n, k)]):.2f} s" for n in cols) + " |")
    print("| stages (summary table total) | " + " | ".join(f"{med(stage_s[n]):.2f} s" for n in cols) + " |")
    print("| **whole `gptcore run`, wall** | " + " | ".join(f"**{med(walls[n]):.2f} s**" for n in cols) + " |")
    print("| whole `gptcore run`, a Prefect server already running (PREFECT_API_URL) | "
          + " | ".join(f"{med(running[n]):.2f} s" for n in cols) + " |")
    for label, values in (("whole, wall", walls), ("server already running", running)):
        print(f"\n{label}, every round: " + "; ".join(
            f"{n} {', '.join(f'{v:.2f}' for v in values[n])} (mean {statistics.mean(values[n]):.2f} s)" for n in cols))
    from _cli import summary

    summary("pipeline", f"cached rerun of `gptcore run {config.name}`, whole process", f"{med(walls['ours']):.2f} s")
    summary("pipeline", f"cached rerun of `gptcore run {config.name}`, Prefect server already running",
            f"{med(running['ours']):.2f} s")
    if "before" in trees:
        print(f"\nbefore / after: {med(walls['before']) / med(walls['ours']):.2f}x faster; "
              f"with a running server {med(running['before']) / med(running['ours']):.2f}x")
    print_timeline(*timeline(works["ours"], config))
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
