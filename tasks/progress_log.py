"""A training stage's progress in Prefect's logs, so `prefect deployment run ... --watch` is not
silent for the minutes pre-training and fine-tuning take.

    progress = StageProgress(stage_logger(), "pretrain", total=config.train.max_steps)
    launch.run_engine("pretrain", config, args, out, callbacks=[buf, progress])
    # pretrain: step 120/300 (40%)  loss 4.1203  val bpb 1.9012  2,410 tok/s  ETA 1m15s

It is an engine callback `cb(event, row)` like `tracking.MetricBuffer`, throttled: a line each
time another `every_pct` % of the steps is done, or `every_s` seconds after the last line,
whichever comes first. gptcore stays Prefect-free: the logger is made here, in tasks/.

`--watch` follows the logs of the flow run it started, and the training stages run in sub-flows
(flows/pipeline.py), whose logs carry their own flow-run id. So the lines are attributed to the
root flow run (and still to the stage's task run, where the Prefect UI shows them too).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable


def stage_logger() -> logging.LoggerAdapter | None:
    """The current task's Prefect run logger, its records on the root flow run; None outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger
    from prefect.runtime import flow_run

    try:
        logger = get_run_logger()
    except MissingContextError:
        return None
    root = flow_run.root_flow_run_id
    if root and str(root) != str(flow_run.id):
        logger = logging.LoggerAdapter(logger, {"flow_run_id": str(root)})  # PrefectLogAdapter merges extra
    return logger


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StageProgress:
    """Logs "stage: step N/total (P%)  loss ...  val bpb ...  tok/s  ETA" through `log.info`."""

    def __init__(self, log, stage: str, total: int, every_pct: float = 10.0, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.stage, self.total = log, stage, max(1, int(total))
        self.every_pct, self.every_s, self.clock = every_pct, every_s, clock
        self.start: tuple[float, int] | None = None  # (time, step) of the first row: a resumed run starts late
        self.last_t = 0.0
        self.last_bucket = -1
        self.fields: dict[str, Any] = {}
        self.lines = 0

    def __call__(self, event: str, row: dict) -> None:
        if self.log is None:
            return
        if event == "end":
            self.log.info(f"{self.stage}: done at step {row.get('step', '?')}/{self.total}")
            return
        if event not in ("log", "eval") or "step" not in row:
            return
        step, now = int(row["step"]), self.clock()
        if self.start is None:
            self.start, self.last_t = (now, step), now
        for k in ("loss", "val_loss", "val_bpb", "tokens_per_s"):
            if isinstance(row.get(k), (int, float)):
                self.fields[k] = row[k]
        bucket = int(100 * step / self.total // self.every_pct)
        if bucket > self.last_bucket or now - self.last_t >= self.every_s:
            self.last_bucket, self.last_t = max(bucket, self.last_bucket), now
            self.lines += 1
            self.log.info(self.line(step, now))

    def line(self, step: int, now: float) -> str:
        f = self.fields
        parts = [f"{self.stage}: step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
        if "loss" in f:
            parts.append(f"loss {f['loss']:.4f}")
        if "val_bpb" in f:
            parts.append(f"val bpb {f['val_bpb']:.4f}")
        elif "val_loss" in f:
            parts.append(f"val loss {f['val_loss']:.4f}")
        if "tokens_per_s" in f:
            parts.append(f"{f['tokens_per_s']:,.0f} tok/s")
        t0, s0 = self.start
        if step > s0 and step < self.total:
            parts.append(f"ETA {_duration((now - t0) / (step - s0) * (self.total - step))}")
        return "  ".join(parts)
