"""Progress bars for long work: a count, a rate and an ETA, plus live fields (loss, tok/s).

A thin layer over rich so every module shows progress the same way and can switch it off
(`enabled=False`, or GPTCORE_PROGRESS=0 in the environment, e.g. in tests and CI logs).

    with progress_bar(total=1000, description="merges", unit="merge") as bar:
        for i in range(1000):
            ...
            bar.update(1, loss=f"{loss:.3f}")
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


def _columns(unit: str) -> list:
    """rich's columns of a bar, with a rate in `unit`/s. rich is imported here, when a bar is shown:
    ~40 ms a command that runs with progress off (GPTCORE_PROGRESS=0, CI) does not pay."""
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text(f"? {unit}/s")
            for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
                if speed >= scale:
                    return Text(f"{speed / scale:.2f} {prefix}{unit}/s")
            return Text(f"{speed:.2f} {unit}/s")

    return [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]


class Bar:
    def __init__(self, progress=None, task_id=None):
        self._progress, self._task = progress, task_id

    def update(self, advance: float = 1, **fields) -> None:
        if self._progress is not None:
            info = "  ".join(f"{k}={v}" for k, v in fields.items())
            if fields:
                self._progress.update(self._task, advance=advance, info=info)
            else:
                self._progress.update(self._task, advance=advance)

    def set_total(self, total: float | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total)


def progress_enabled(enabled: bool | None = None) -> bool:
    if enabled is not None:
        return enabled
    return os.environ.get("GPTCORE_PROGRESS", "1") not in ("0", "false", "no")


@contextlib.contextmanager
def progress_bar(total: float | None, description: str, unit: str = "it", enabled: bool | None = None) -> Iterator[Bar]:
    if not progress_enabled(enabled):
        yield Bar(None)
        return
    from rich.progress import Progress

    with Progress(*_columns(unit), transient=False, console=None if sys.stderr.isatty() else None) as progress:
        task_id = progress.add_task(description, total=total, info="")
        yield Bar(progress, task_id)
