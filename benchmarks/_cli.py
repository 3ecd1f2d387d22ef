"""`--name value` options for a benchmark script from keyword defaults: cli_args(mb=8.0, procs=2)."""

from __future__ import annotations

import argparse
import os


def cli_args(description: str | None = None, **defaults) -> argparse.Namespace:
    """One option per keyword (underscores become dashes), typed like its default."""
    ap = argparse.ArgumentParser(description=description)
    for name, default in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return ap.parse_args()


def summary(area: str, what: str, figure: str) -> None:
    """One row of `make bench`'s closing table (benchmarks/_summary.py collects these lines)."""
    print(f"summary: {area} | {what} | {figure}")


def cli_env(**extra: str) -> dict:
    """The environment for a `gptcore` subprocess of a benchmark: this one's, less $GPTCORE_SET (a benchmark
    measures its configs as written, never a reader's quick-try shrink), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "GPTCORE_SET"}
    return {**env, **extra}


def fresh_inductor_cache() -> None:
    """Point torch.compile at an empty cache, removed at exit (call before importing torch): the compile
    time a benchmark measures is then what a first run pays, not a cache hit from an earlier run."""
    import atexit
    import os
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="gptcore-inductor-")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", path)
    atexit.register(shutil.rmtree, path, True)
