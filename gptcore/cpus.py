"""How many CPU threads a run uses by default: one per physical core it may run on, shared, never more.

    physical_cores()     cores of this process's CPU affinity, a core's hyper-threads counted once
    torch_threads(ranks) torch's intra-op threads per process: OMP_NUM_THREADS when set, else the
                         physical cores divided among the `ranks` processes of this machine

Why it matters: PyTorch's CPU kernels run on OpenMP threads that spin while they wait for each
other. With more threads than free cores (hyper-threads, several ranks, tokenizer workers, or other
jobs on a shared machine) a spinning thread steals the core its partner needs, and a step can take
several times longer (BENCHMARKS.md, "threads"). So threads are counted in physical cores, split
between ranks, and the CLI asks OpenMP to sleep rather than spin (OMP_WAIT_POLICY=PASSIVE, unless
set) before torch loads.
"""

from __future__ import annotations

import os
from pathlib import Path


def _cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (Linux sysfs topology; elsewhere the CPUs)."""
    cores = set()
    for cpu in _cpus():
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def torch_threads(ranks: int = 1, environ=os.environ) -> int:
    """Intra-op threads for one of `ranks` processes on this machine (OMP_NUM_THREADS wins when set)."""
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"])
    return max(1, physical_cores() // max(1, ranks))


def quiet_openmp(environ=os.environ) -> None:
    """OpenMP threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE), unless the
    user chose: call before torch is imported (it is read once, when the OpenMP runtime starts)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
