"""Stopping the processes gptcore started: SIGTERM, a grace period, then SIGKILL for what is left.

    stop(procs, grace=10, kill_wait=5)              each process alone (a sweep's worker processes)
    stop([proc], grace=10, kill_wait=5, group=True) the process group `proc` leads (torchrun and its ranks)

A process that ends on SIGTERM unwinds its `finally` blocks (its MLflow runs marked KILLED, its own
children stopped) and is never killed; one that ignores SIGTERM, or is stuck where no signal handler
runs, gets SIGKILL once `grace` seconds have passed since the SIGTERM. The grace is shared: every
process gets its SIGTERM first, then all are waited on together.

`procs` are subprocess.Popen or multiprocessing.Process objects (flows/sweep.py's workers are
concurrent.futures' multiprocessing processes); they differ only in how one waits for them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence


def alive(p) -> bool:
    """Whether `p` (a Popen or a multiprocessing.Process) is still running; a finished one is reaped."""
    return p.is_alive() if hasattr(p, "is_alive") else p.poll() is None


def _wait(p, timeout: float) -> None:
    if hasattr(p, "join"):  # multiprocessing.Process
        p.join(max(0.0, timeout))
        return
    try:
        p.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        pass


def _send(p, sig: int, group: bool) -> None:
    if not group:  # the objects' own methods know whether the pid is still theirs
        p.terminate() if sig == signal.SIGTERM else p.kill()
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:  # the group is gone already
        pass


def stop(procs: Sequence, grace: float = 10.0, kill_wait: float = 5.0, group: bool = False) -> None:
    """SIGTERM every live process of `procs` (its whole process group with `group`), wait up to `grace`
    seconds for them all, SIGKILL those still alive, and wait up to `kill_wait` seconds more."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        left = [p for p in procs if alive(p)]
        if not left:
            return
        for p in left:
            _send(p, sig, group)
        deadline = time.monotonic() + wait
        for p in left:
            _wait(p, deadline - time.monotonic())
