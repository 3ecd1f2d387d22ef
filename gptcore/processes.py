"""Stopping the processes gptcore started: SIGTERM, a grace period, then SIGKILL for what is left.

    stop(procs, grace=10, kill_wait=5)             each process of `procs` alone
    stop([proc], grace=10, kill_wait=5, tree=True) `proc` and every process below it (torchrun and its
                                                   ranks; a sweep's workers and the ranks of their cells)
    with owned_tree(proc): ...                     a tree that kill_owned_trees() ends at a forced exit

A process that ends on SIGTERM unwinds its `finally` blocks (its MLflow runs marked KILLED, its own
children stopped) and is never killed; one that ignores SIGTERM, or is stuck where no signal handler
runs, gets SIGKILL once `grace` seconds have passed since the SIGTERM. The grace is shared: every
process gets its SIGTERM first, then all are waited on together.

Why a tree and not a process group: torchrun starts each rank in a session of its own, so a signal
to torchrun's group never reaches the ranks, and a rank whose torchrun was killed is re-parented
and found by nobody. So the tree is listed before the first signal (and again while its leader
lives), and every process listed is waited for, whoever its parent is by then.
The CLI's shutdown deadline (gptcore/cli.py) may end gptcore while `stop` still waits out its grace;
it calls `kill_owned_trees` first, so the ranks of a launch never outlive gptcore.

`procs` are subprocess.Popen or multiprocessing.Process objects (flows/sweep.py's workers are
concurrent.futures' multiprocessing processes); they differ only in how one waits for them.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

import psutil

_OWNED: dict[int, subprocess.Popen] = {}  # trees started here and not yet known to be stopped


def alive(p) -> bool:
    """Whether `p` (a Popen or a multiprocessing.Process) is still running; a finished one is reaped."""
    return p.is_alive() if hasattr(p, "is_alive") else p.poll() is None


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below `pid` (children, their children, ...); [] once `pid` is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _live(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for q in procs:
        with contextlib.suppress(psutil.Error):
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q)
    return out


def _wait(p, timeout: float) -> None:
    if hasattr(p, "join"):  # multiprocessing.Process
        p.join(max(0.0, timeout))
        return
    try:
        p.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        pass


def _send(p, sig: int) -> None:
    """`sig` to a Popen / multiprocessing.Process (their own methods know whether the pid is still theirs)
    or to a psutil.Process (which checks the pid's start time)."""
    with contextlib.suppress(psutil.Error, ProcessLookupError):
        p.terminate() if sig == signal.SIGTERM else p.kill()


def stop(procs: Sequence, grace: float = 10.0, kill_wait: float = 5.0, tree: bool = False) -> None:
    """SIGTERM every live process of `procs` (with `tree`, every process below each too), wait up to
    `grace` seconds for them all, SIGKILL those still alive, and wait up to `kill_wait` seconds more."""
    below: dict[int, psutil.Process] = {}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        if tree:
            below.update((q.pid, q) for p in procs for q in descendants(p.pid))
        left, rest = [p for p in procs if alive(p)], _live(list(below.values()))
        if not left and not rest:
            return
        for p in [*left, *rest]:
            _send(p, sig)
        deadline = time.monotonic() + wait
        for p in left:
            _wait(p, deadline - time.monotonic())
        if rest:
            psutil.wait_procs(rest, timeout=max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def owned_tree(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """While inside, `proc` and the processes below it are ones that kill_owned_trees() kills; leave the
    block only once they have been waited for (`stop`, or `proc` ended by itself)."""
    _OWNED[proc.pid] = proc
    try:
        yield proc
    finally:
        _OWNED.pop(proc.pid, None)


def kill_owned_trees() -> None:
    """SIGKILL every owned tree still registered, leaves first: for an exit that cannot wait for `stop`."""
    for proc in list(_OWNED.values()):
        for q in reversed(descendants(proc.pid)):
            _send(q, signal.SIGKILL)
        if alive(proc):
            _send(proc, signal.SIGKILL)
