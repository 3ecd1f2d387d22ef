"""`metrics.jsonl`: the training log, one JSON object per line, append-only, flushed per line.

Rows are either a training step or an evaluation:

    {"step": 10, "loss": 5.21, "lr": 0.001, "grad_norm": 0.83, "tokens": 40960, "tokens_per_s": 9120.4, "mfu": 0.012}
    {"step": 100, "val_loss": 4.02, "val_bpb": 1.71}

A resumed run first cuts the file back to what the checkpoint it resumes from had seen: a trailing
half-written line (the process died mid-write) and every row past the resume step go, then new rows
are appended. Reading the file therefore never shows the same step twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete row of a metrics file (a torn last line is ignored)."""
    return list(_rows(Path(path)))


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return  # torn write
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def truncate_metrics(path: str | Path, keep_through_step: int) -> None:
    """Rewrite `path` keeping only complete rows with step <= `keep_through_step` (atomically)."""
    from gptcore.fileio import atomic_write_text

    path = Path(path)
    if not path.exists():
        return
    kept = [row for row in _rows(path) if row.get("step", 0) <= keep_through_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    """Append rows to `path`; with `resume_step` set, first cut the file back to that step."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if self.path.exists():
                self.path.unlink()  # a fresh run starts a fresh log
        else:
            truncate_metrics(self.path, resume_step)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()  # a reader (the pipeline, `tail -f`) sees every row as soon as it is logged

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
