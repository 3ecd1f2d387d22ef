"""Stage progress in Prefect's logs (tasks/progress_log.py): throttled lines, attributed to the root flow run."""

from __future__ import annotations

import pytest

from tasks.progress_log import StageProgress


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_line_every_ten_percent_and_every_thirty_seconds():
    log, clock = Lines(), Clock()
    p = StageProgress(log, "pretrain", total=300, clock=clock)
    for step in range(10, 301, 10):  # a row every 10 steps, one second apart
        clock.t += 1
        p("log", {"step": step, "loss": 5.0 - step / 100, "tokens_per_s": 2400.0})
    assert [line.split()[2] for line in log.lines] == [f"{s}/300" for s in (10, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300)]
    assert log.lines[1] == "pretrain: step 30/300 (10%)  loss 4.7000  2,400 tok/s  ETA 27s"

    slow, clock = Lines(), Clock()
    p = StageProgress(slow, "finetune", total=1000, clock=clock)
    for step in range(1, 40):  # 4% in all, 12 s per step: a line per 30 s, none per percent
        clock.t += 12
        p("log", {"step": step, "loss": 1.0})
    p("eval", {"step": 39, "val_loss": 0.9})
    steps = [int(line.split()[2].split("/")[0]) for line in slow.lines]
    assert steps == [1, *range(4, 39, 3)]  # the first row, then one per 30 s: every 3rd row of 12 s
    assert slow.lines[-1].startswith("finetune: step 37/1000 (4%)  loss 1.0000  ETA ")
    p("end", {"step": 39})
    assert slow.lines[-1] == "finetune: done at step 39/1000"


def test_without_a_prefect_run_nothing_is_logged():
    p = StageProgress(None, "pretrain", total=10)
    p("log", {"step": 1, "loss": 1.0})
    p("end", {"step": 1})
    assert p.lines == 0


@pytest.mark.slow
def test_lines_of_a_subflows_task_reach_the_root_flow_runs_logs():
    """What `prefect deployment run --watch` follows: logs whose flow_run_id is the run it started."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging import get_run_logger
    from prefect.testing.utilities import prefect_test_harness

    from tasks.progress_log import stage_logger

    @task
    def stage():
        StageProgress(stage_logger(), "pretrain", total=2)("log", {"step": 2, "loss": 1.5})

    @flow
    def sub():
        stage()

    @flow
    def root() -> str:
        sub()
        return str(get_run_logger().extra["flow_run_id"])

    with prefect_test_harness(server_startup_timeout=120):
        root_id = root()
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[root_id])))
    assert any(log.message.startswith("pretrain: step 2/2 (100%)  loss 1.5000") and log.task_run_id for log in logs), \
        [log.message for log in logs]
