"""`make bench`'s closing table: the `summary:` rows every benchmark printed, in one markdown table.

    python benchmarks/_summary.py benchmarks/results/latest

With the `_runs.json` that benchmarks/_bench.py writes beside the outputs, each row also gives the
command that produced it, its wall time and the load average before / after it ran.
"""

import json
import os
import sys
from pathlib import Path


def main(folder: str) -> None:
    folder = Path(folder)
    meta_file = folder / "_runs.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"runs": {}}
    print(f"\n## make bench: one table (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    if "machine" in meta:
        print(f"machine: {meta['machine']}; started {meta['started']}\n")
    print("| area | measurement | figure | command | wall | load before → after |\n|---|---|---|---|---:|---|")
    for f in sorted(folder.glob("*.md")):
        run = meta["runs"].get(f.stem, {})
        where = (f"`{run['command']}` | {run['wall_s']:.0f} s | {run['load_before']} → {run['load_after']}"
                 if run else " | | ")
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.startswith("summary: "):
                print(f"| {line.removeprefix('summary: ').strip()} | {where} |")
        if run.get("rc"):
            print(f"| {f.stem} | **failed** (exit {run['rc']}) | see {f.stem}.log | `{run['command']}` | | |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest")
