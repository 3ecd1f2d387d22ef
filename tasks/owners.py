"""Which process owns a RUNNING MLflow run, and closing the runs whose owner died.

A `gptcore run` that ends normally, or by Ctrl-C or SIGTERM, ends its MLflow runs itself (FINISHED,
FAILED, KILLED). One killed by SIGKILL, the OOM killer or a power cut cannot: its pipeline and stage
runs would stay RUNNING forever. So every run we start carries its owner as tags,

    gptcore.owner.host   socket.gethostname()
    gptcore.owner.pid    the process id
    gptcore.owner.start  the process's start time (field 22 of /proc/<pid>/stat: clock ticks since
                         boot), so a new process that got the same pid is not taken for the owner

and the next pipeline run on the same host closes, with one `search_runs` call per experiment, the
RUNNING runs whose owner is gone: status KILLED, tag `gptcore.killed_reason` saying why. A run whose
owner lives on another host, or whose liveness cannot be read (no /proc), is left alone.
"""

from __future__ import annotations

import os
import socket
import time

from mlflow.tracking import MlflowClient

HOST, PID, START = "gptcore.owner.host", "gptcore.owner.pid", "gptcore.owner.start"
REASON = "gptcore.killed_reason"


def start_ticks(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()[19].decode()  # after "(comm)": field 22 is the 20th


def owner_tags() -> dict[str, str]:
    """This process as the owner of the runs it starts."""
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: str(pid), START: start_ticks(pid) or ""}


def owner_alive(tags: dict[str, str]) -> bool:
    """False only when the owner is provably gone: no process with its pid, or one started at another time."""
    if not os.path.isdir("/proc/self") or not tags.get(PID, "").isdigit():
        return True
    ticks = start_ticks(int(tags[PID]))
    return ticks is not None and (not tags.get(START) or ticks == tags[START])


def reconcile(c: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment_id` owned by a dead process on this host; their ids."""
    host = socket.gethostname().replace("'", "")
    runs = c.search_runs([experiment_id], max_results=1000,
                         filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{host}'")
    closed = []
    for run in runs:
        tags = run.data.tags
        if owner_alive(tags):
            continue
        why = (f"its process (pid {tags.get(PID)} on {tags.get(HOST)}) ended without closing it; "
               f"found by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        c.set_tag(run.info.run_id, REASON, why)
        c.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed
