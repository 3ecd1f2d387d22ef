"""Run a command from a small, fresh process; write its wall time and peak RSS as JSON.

    python benchmarks/_launch.py RESULT.json COMMAND [ARGS...]

Why a launcher: on Linux a forked child's peak RSS (ru_maxrss) starts at its parent's high-water
mark, and exec does not reset it. A benchmark that has grown to 400 MB (in-process runs, a corpus
in memory) and starts `gptcore prepare` directly reads 400 MB for it, whatever it used: the quiet
`make bench` of 2026-12-01 reported 375 MB for both `gptcore prepare` and llm.c's recipe at 8 MB,
and 402 MB at 8 MB and at 50 MB. Forked from this ~10 MB interpreter, the command's own peak shows
(largest of the command and the children it waited for, e.g. a Pool's workers). The wall time is
taken here, from just before the fork to the end of the wait, so the launcher's start is not in it.
"""

import json
import os
import sys
import time


def main() -> int:
    result, cmd = sys.argv[1], sys.argv[2:]
    t, start = time.perf_counter(), time.time()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall, end = time.perf_counter() - t, time.time()
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as f:
        json.dump({"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "returncode": code,
                   "start_unix": start, "end_unix": end}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
