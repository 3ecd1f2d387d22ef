"""Many processes through PyTorch's own launcher: `torch.distributed.run` (torchrun) as a child process (its own session).

    nproc_per_node × nnodes > 1  ->  python -m torch.distributed.run --nproc_per_node N
                                        (--standalone | --nnodes M --node_rank r --master_addr H --master_port P)
                                        -m gptcore.training.worker ENGINE config.json ARGS... summary.json

torchrun does the spawning and the rendezvous (its static rendezvous for several nodes: node 0's
address is `train.rdzv_endpoint`); every rank runs the same engine (DDP or FSDP2 inside,
gptcore/training/distributed.py) and rank 0 writes metrics.jsonl, checkpoints and the summary.
This module only starts torchrun, follows it and turns its ending into one clear outcome:

- the run's rows: `metrics.jsonl` is followed while it grows, so callbacks (MLflow, a progress
  bar) see each row as rank 0 writes it, not at the end;
- Ctrl-C or SIGTERM here: torchrun and every rank below it are terminated (then killed), no orphans
  (gptcore/processes.py; the CLI's shutdown deadline kills them if it cannot wait);
- a rank that fails: its own error (a GptcoreError's line, or the last line of its traceback, or
  the signal that killed it) becomes one GptcoreError naming the rank; torchrun's log is kept in
  `<out>/.launch/` for the details.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from gptcore.cpus import torch_threads
from gptcore.errors import ConfigError, GptcoreError
from gptcore.fileio import atomic_write_json, atomic_write_text
from gptcore.processes import owned_tree, stop

Callback = Callable[[str, dict], None]


def visible_devices() -> tuple[str, int]:
    """("cuda", number of visible GPUs) when there are any, else ("cpu", number of cores)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", os.cpu_count() or 1


def resolve_nproc(value: int | str | None, key: str) -> int:
    """`auto` -> the visible CUDA devices (1 on CPU); a number must not exceed what is visible."""
    kind, count = visible_devices()
    if value in (None, "auto"):
        return count if kind == "cuda" else 1
    n = int(value)
    if n > count:
        what = f"{count} visible CUDA device(s)" if kind == "cuda" else f"{count} CPU core(s) and no GPU"
        raise ConfigError(f"{key}={n} asks for more processes than this machine has ({what})", key,
                          f"set {key} to at most {count}, or 'auto'")
    return n


def launch_dir_of(out_dir: str | Path, train) -> Path:
    """Where one node's launch keeps its config, logs and errors (per node: nodes may share out_dir)."""
    return Path(out_dir) / (".launch" if train.nnodes == 1 else f".launch-node{train.node_rank}")


def nproc_of(engine: str, config) -> int:
    """Ranks per node for `engine`: finetune.nproc_per_node for fine-tuning when set, else train.nproc_per_node."""
    if engine == "finetune" and config.finetune.nproc_per_node is not None:
        return resolve_nproc(config.finetune.nproc_per_node, "finetune.nproc_per_node")
    return resolve_nproc(config.train.nproc_per_node, "train.nproc_per_node")


def _torchrun_args(nproc: int, train) -> list[str]:
    args = ["--nproc_per_node", str(nproc)]
    if train.nnodes == 1:
        return args + ["--standalone"]
    host, _, port = (train.rdzv_endpoint or "").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"train.rdzv_endpoint {train.rdzv_endpoint!r} is not HOST:PORT", "train.rdzv_endpoint",
                          "give node 0's address and a free port, e.g. 10.0.0.1:29500")
    return args + ["--nnodes", str(train.nnodes), "--node_rank", str(train.node_rank),
                   "--master_addr", host, "--master_port", port]


class MetricsFollower(threading.Thread):
    """Calls `callbacks` with each new complete row of a growing metrics.jsonl (a resume may cut it back)."""

    def __init__(self, path: Path, callbacks: Sequence[Callback], poll: float = 0.5):
        super().__init__(daemon=True)
        self.path, self.callbacks, self.poll = path, list(callbacks), poll
        self.offset = path.stat().st_size if path.exists() else 0  # rows of earlier runs were reported then
        self.last = {"log": -1, "eval": -1}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.read()
            self.done.wait(self.poll)
        self.read()

    def read(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:  # a resumed run truncated the file back to its checkpoint
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only complete lines
        self.offset += end
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            event = "eval" if "val_loss" in row else "log"
            if row.get("step", 0) <= self.last[event]:
                continue  # re-appended after a resume: already reported
            self.last[event] = row.get("step", 0)
            for cb in self.callbacks:
                cb(event, row)


def _rank_failure(launch_dir: Path, log: str) -> str:
    """What went wrong: torchrun's root cause (the first rank to fail), told in that rank's own words
    when it left them (error-rank{R}.json), else the signal or exit code that ended it."""
    own = {}
    for f in sorted(launch_dir.glob("error-rank*.json")):
        try:
            e = json.loads(f.read_text())
            own[int(e["rank"])] = e["message"]
        except (OSError, ValueError, KeyError):
            continue
    root = log.split("Root Cause", 1)[-1]
    first = re.search(r"rank\s*:\s*(\d+)\s*\(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", root)
    if first:
        rank, code = int(first.group(1)), int(first.group(2))
        if code < 0:
            try:
                return f"rank {rank} was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"rank {rank} was killed by signal {-code}"
        if rank in own:
            return f"rank {rank}: {own[rank]}"
        return f"rank {rank} exited with code {code}"
    if own:
        rank = min(own)
        return f"rank {rank}: {own[rank]}"
    tail = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return f"torchrun failed: {tail[0][:300]}"


def launch(engine: str, config, args: Sequence[str], out_dir: str | Path, nproc: int,
           callbacks: Sequence[Callback] = ()) -> dict:
    """Run `engine` ("pretrain" | "finetune") with `args` on nproc × nnodes ranks; rank 0's summary.

    `out_dir` is the engine's output folder (it gets `.launch/` with the config, logs and errors);
    `callbacks` receive each metrics row as it is written. Raises GptcoreError when a rank fails."""
    out_dir = Path(out_dir).resolve()  # absolute in every rank's command line
    launch_dir = launch_dir_of(out_dir, config.train)
    launch_dir.mkdir(parents=True, exist_ok=True)
    for stale in launch_dir.glob("error-rank*.json"):
        stale.unlink()
    cfg_file, summary_file, log_file = launch_dir / "config.json", launch_dir / "summary.json", launch_dir / "torchrun.log"
    atomic_write_text(cfg_file, config.model_dump_json())
    summary_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *_torchrun_args(nproc, config.train),
           "-m", "gptcore.training.worker", engine, str(cfg_file), *map(str, args), str(summary_file)]
    env = dict(os.environ, GPTCORE_PROGRESS="0", TORCH_DISTRIBUTED_DEBUG=os.environ.get("TORCH_DISTRIBUTED_DEBUG", "OFF"))
    env.setdefault("OMP_NUM_THREADS", str(config.train.num_threads or torch_threads(nproc, environ={})))  # physical cores / ranks
    follower = MetricsFollower(out_dir / "metrics.jsonl", callbacks)
    follower.start()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            with owned_tree(proc):  # the CLI's shutdown deadline kills the tree if it must exit first
                try:
                    while proc.poll() is None:
                        time.sleep(0.2)
                except BaseException:  # Ctrl-C, SIGTERM (SystemExit), anything: no rank outlives us
                    stop([proc], grace=10, kill_wait=5, tree=True)  # torchrun and its ranks (their own sessions)
                    raise
        finally:
            follower.done.set()
            follower.join(timeout=10)
    if proc.returncode != 0:
        what = _rank_failure(launch_dir, log_file.read_text(errors="replace"))
        raise GptcoreError(f"{engine} failed on {nproc * config.train.nnodes} processes: {what}", str(log_file),
                           "fix the cause and run again: it resumes from the newest checkpoint")
    if config.train.node_rank != 0:  # rank 0 (on node 0) writes the summary
        return {"node_rank": config.train.node_rank, "world_size": nproc * config.train.nnodes}
    return json.loads(summary_file.read_text())


def record_failure(launch_dir: str | Path, rank: int, message: str) -> None:
    """A rank's own account of its failure, for `launch` to report (one file per rank)."""
    atomic_write_json(Path(launch_dir) / f"error-rank{rank}.json", {"rank": rank, "message": message})


def run_engine(engine: str, config, args: Sequence[str], out_dir: str | Path, callbacks: Sequence[Callback] = ()) -> dict:
    """The one door to a training engine: in this process for one rank, under torchrun for more.

    `engine` is "pretrain" (args: data_dir) or "finetune" (args: base_dir). The number of ranks is
    `train.nproc_per_node` (`finetune.nproc_per_node` for fine-tuning) × `train.nnodes`. Inside a
    process torchrun already started (LOCAL_RANK set), the engine runs here: no nested launch."""
    nproc = nproc_of(engine, config)
    if nproc * config.train.nnodes == 1 or "LOCAL_RANK" in os.environ:
        if engine == "pretrain":
            from gptcore.training.pretrain import pretrain

            return pretrain(config, *args, out_dir, callbacks=callbacks)
        from gptcore.finetuning.finetune import finetune

        return finetune(config, *args, out_dir, callbacks=callbacks)
    summary = launch(engine, config, [*args, out_dir], out_dir, nproc, callbacks)
    for cb in callbacks:
        cb("end", summary)
    return summary
