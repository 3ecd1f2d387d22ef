"""benchmarks/_launch.py: the peak RSS a benchmark reports for a process is that process's own.

The reference is the kernel's accounting itself: a child started straight from a large parent reports
the parent's high-water mark (the quiet `make bench` of 2026-12-01 read 375-402 MB for every process
that way); through the launcher, a bare interpreter reports a bare interpreter's memory and a child
that fills 150 MB reports at least 150 MB.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / "benchmarks" / "_launch.py"


def _launched(tmp_path: Path, code: str) -> dict:
    rec = tmp_path / "rec.json"
    subprocess.run([sys.executable, str(LAUNCH), str(rec), sys.executable, "-c", code], check=True)
    return json.loads(rec.read_text())


def test_peak_rss_is_the_commands_own_not_the_parents(tmp_path):
    ballast = bytearray(300 << 20)  # this process's high-water mark: over 300 MB
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    direct = os.wait4(p.pid, 0)[2].ru_maxrss / 1024
    assert direct > 300  # what a child started directly reports: the parent's memory, not its own
    bare = _launched(tmp_path, "pass")
    filled = _launched(tmp_path, "b = bytearray(150 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1")
    del ballast
    assert bare["returncode"] == 0 and bare["peak_rss_mb"] < 100, bare
    assert 150 <= filled["peak_rss_mb"] < 250, filled
    assert 0 < bare["wall_s"] < 30 and bare["start_unix"] <= bare["end_unix"]


def test_the_commands_exit_code_comes_back(tmp_path):
    rec = tmp_path / "rec.json"
    r = subprocess.run([sys.executable, str(LAUNCH), str(rec), sys.executable, "-c", "raise SystemExit(3)"])
    assert r.returncode == 3 and json.loads(rec.read_text())["returncode"] == 3
