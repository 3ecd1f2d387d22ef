"""`make bench`'s closing table: the `summary:` rows every benchmark printed, in one markdown table.

    python benchmarks/_summary.py benchmarks/results/latest
"""

import os
import sys
from pathlib import Path


def main(folder: str) -> None:
    rows = [line.removeprefix("summary: ").strip() for f in sorted(Path(folder).glob("*.md"))
            for line in f.read_text(encoding="utf-8").splitlines() if line.startswith("summary: ")]
    print(f"\n## make bench: one table (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print("| area | measurement | figure |\n|---|---|---|")
    for r in rows:
        print(f"| {r} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest")
