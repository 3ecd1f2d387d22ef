"""gptcore/processes.py `stop`: SIGTERM first, SIGKILL only for what outlives the grace.

Real children, real signals; what each one received is read from outside: the exit status the
kernel reports (-15 for SIGTERM's default action, -9 for SIGKILL) and the line a child writes
when its SIGTERM handler runs."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from gptcore.processes import stop

GRACE = 2  # s: room for a loaded machine to run the child's SIGTERM handler before the SIGKILL

# Children share one pipe (a tree's leader and its child): each line is one os.write, atomic on a
# pipe, so two children's lines never interleave (print writes the text and its newline apart
# when stdout is unbuffered, as under PYTHONUNBUFFERED).
IGNORES_SIGTERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: os.write(1, b"got SIGTERM\\n"))
os.write(1, b"ready\\n")
while True:
    time.sleep(0.05)
"""
EXITS_ON_SIGTERM = """
import os, sys, time
os.write(1, b"ready\\n")
while True:
    time.sleep(0.05)
"""
LEADS_A_TREE = """
import os, signal, subprocess, sys
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, lambda *a: os.write(1, b"leader got SIGTERM\\n"))
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)  # as torchrun starts a rank
os.write(1, b"%d\\n" % child.pid)
child.wait()
"""


def child(code: str, *args: str, **kw) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, **kw)
    assert p.stdout.readline().strip(), "the child did not start"
    return p


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace():
    p = child(IGNORES_SIGTERM)
    stop([p], grace=GRACE, kill_wait=5)
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.read().splitlines() == ["got SIGTERM"]  # it had its SIGTERM first


def test_a_child_that_exits_on_sigterm_is_not_killed():
    p = child(EXITS_ON_SIGTERM)
    stop([p], grace=60, kill_wait=5)  # a long grace: it returns as soon as the child is gone
    assert p.returncode == -signal.SIGTERM


def test_several_children_share_one_grace_and_only_the_stubborn_one_is_killed():
    stubborn, polite = child(IGNORES_SIGTERM), child(EXITS_ON_SIGTERM)
    stop([stubborn, polite], grace=GRACE, kill_wait=5)
    assert (stubborn.returncode, polite.returncode) == (-signal.SIGKILL, -signal.SIGTERM)


def test_a_finished_child_gets_no_signal():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stop([p], grace=0.5)
    assert p.returncode == 0


def tree(leader_ignores: str) -> tuple[subprocess.Popen, psutil.Process]:
    """A leader (as launch starts torchrun) whose child, in a session of its own (as torchrun starts
    each rank), ignores SIGTERM; (the leader, the child) once both are running."""
    leader = child(LEADS_A_TREE, IGNORES_SIGTERM, leader_ignores, start_new_session=True)
    assert leader.stdout.readline().strip(), "the grandchild did not start"  # its pid and its "ready", either order
    return leader, psutil.Process(leader.pid).children()[0]


def assert_dead(q: psutil.Process) -> None:
    psutil.wait_procs([q], timeout=5)
    assert not q.is_running() or q.status() == psutil.STATUS_ZOMBIE, "it outlived stop()"


def test_tree_mode_reaches_a_child_in_its_own_session():
    """Both ignore SIGTERM: each had it (a signal to the leader's group would miss the child), then
    both get SIGKILL after the grace."""
    leader, grandchild = tree("ignore")
    stop([leader], grace=GRACE, kill_wait=5, tree=True)
    assert leader.returncode == -signal.SIGKILL
    assert_dead(grandchild)
    assert sorted(leader.stdout.read().splitlines()) == ["got SIGTERM", "leader got SIGTERM"]


def test_tree_mode_stops_a_child_whose_leader_died_first():
    """The leader ends on SIGTERM at once; its stubborn child, re-parented, is still killed after the grace."""
    leader, grandchild = tree("exit")
    stop([leader], grace=GRACE, kill_wait=5, tree=True)
    assert leader.returncode == -signal.SIGTERM
    assert_dead(grandchild)
    assert leader.stdout.read().splitlines() == ["got SIGTERM"]


def test_a_forced_exit_kills_the_owned_trees():
    """What the CLI's shutdown deadline calls before os._exit: every owned tree SIGKILLed, none waited on."""
    from gptcore.processes import kill_owned_trees, owned_tree

    leader, grandchild = tree("ignore")
    with owned_tree(leader):
        kill_owned_trees()
        assert leader.wait(timeout=60) == -signal.SIGKILL
        assert_dead(grandchild)
    other, its_child = tree("ignore")  # no longer owned: left alone
    kill_owned_trees()
    assert other.poll() is None and its_child.is_running()
    stop([other], grace=0, kill_wait=5, tree=True)
    assert_dead(its_child)


def _ignore_sigterm_then_sleep(flag: str) -> None:
    signal.signal(signal.SIGTERM, lambda *a: Path(flag).write_text("got SIGTERM"))
    Path(flag + ".ready").touch()
    while True:
        time.sleep(0.05)


def _sleep(flag: str) -> None:
    Path(flag + ".ready").touch()
    while True:
        time.sleep(0.05)


def test_multiprocessing_workers_as_a_sweep_has_them(tmp_path):
    """flows/sweep.py's workers are multiprocessing processes (concurrent.futures'): the same rules."""
    ctx = multiprocessing.get_context("spawn")
    flags = [str(tmp_path / "stubborn"), str(tmp_path / "polite")]
    procs = [ctx.Process(target=_ignore_sigterm_then_sleep, args=(flags[0],)), ctx.Process(target=_sleep, args=(flags[1],))]
    for p in procs:
        p.start()
    deadline = time.time() + 120
    while not all(Path(f + ".ready").exists() for f in flags):
        assert time.time() < deadline, "the workers did not start"
        time.sleep(0.05)
    stop(procs, grace=GRACE, kill_wait=5)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL, -signal.SIGTERM]
    assert Path(flags[0]).read_text() == "got SIGTERM"
