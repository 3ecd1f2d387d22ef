"""`make bench`: every CPU benchmark once, quietly, at a size that fits ~10 minutes on 2 cores, then one table.

    python benchmarks/_bench.py [--out benchmarks/results/latest] [--only model,train]

Each benchmark's stdout goes to OUT/NAME.md, its stderr to OUT/NAME.log; nothing else is printed
until the closing table (benchmarks/_summary.py), which gives each figure with its command, the
machine and the load average (os.getloadavg) before and after that benchmark ran. The sizes below
are the "size knob": the scripts' own defaults are the larger runs BENCHMARKS.md quotes.
GPU checks (benchmarks/gpu.py) are not part of it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, arguments): quick sizes for `make bench`
RUNS = [
    ("tokenizer", ["--mb", "5"]),
    ("tokenizer_scale", ["--mb", "25,100", "--sp-max-mb", "25"]),
    ("data", ["--rounds", "1"]),  # whole process: best of 5 (--whole-rounds), streaming up to 200 MB
    ("model", ["--rounds", "3"]),
    ("train", ["--steps", "25", "--rounds", "3"]),
    ("finetune", []),
    ("pipeline", ["--repeats", "1"]),
    ("recipe", ["--seeds", "1", "--steps", "60", "--eval-every", "10", "--threads", "1"]),
    ("rerun", ["--config", "benchmarks/configs/rerun-small.yaml", "--rounds", "2"]),
]


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main() -> int:
    sys.path.insert(0, str(HERE))
    from _cli import cli_args

    args = cli_args(__doc__.splitlines()[0], out=str(HERE / "results" / "latest"), only="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    meta, failed = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}, []
    for name, extra in RUNS:
        if only and name not in only:
            continue
        if name == "recipe":  # its report file, out of the committed benchmarks/results/recipe.md
            extra = [*extra, "--out", str(out.resolve() / "recipe.report.txt")]
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
        before, t0 = os.getloadavg()[0], time.perf_counter()
        with open(out / f"{name}.md", "w") as so, open(out / f"{name}.log", "w") as se:
            rc = subprocess.call(cmd, stdout=so, stderr=se, cwd=HERE.parent)
        meta["runs"][name] = {"command": " ".join(["python", f"benchmarks/{name}.py", *extra]), "rc": rc,
                              "wall_s": round(time.perf_counter() - t0, 1), "load_before": round(before, 1),
                              "load_after": round(os.getloadavg()[0], 1)}
        if rc != 0:
            failed.append(name)
    (out / "_runs.json").write_text(json.dumps(meta, indent=1))
    from _summary import main as table

    table(str(out))
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see {out}/NAME.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
