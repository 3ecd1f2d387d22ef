"""Where the whole-process seconds go: `gptcore prepare` and llm.c's recipe, phase by phase.

    python benchmarks/_prepare_phases.py MARKS ours CONFIG OUT      # the real `gptcore prepare CONFIG --out OUT`
    python benchmarks/_prepare_phases.py MARKS peer OUT MAX_BYTES NPROCS   # benchmarks/_llmc_fineweb.py

Each side runs unchanged, with its own code; this script only wraps the functions that begin and
end each phase so that they append `<unix time> <phase>` to MARKS as they happen (a line per mark,
flushed: `gptcore prepare` leaves with os._exit, so nothing is written at exit). benchmarks/data.py
starts it, notes the time just before the process starts and just after it ends, and turns the
marks into one table: interpreter start, imports, vocabulary, encoding construction, the encode
loop (read + encode + write, pipelined), the final outputs, process exit.
"""

from __future__ import annotations

import os
import sys
import time

_MARKS = open(sys.argv[1], "a", buffering=1)


def mark(phase: str) -> None:
    _MARKS.write(f"{time.time():.6f} {phase}\n")


def wrap(owner, name: str, before: str | None = None, after: str | None = None) -> None:
    """owner.name(...) marks `before` as its first call starts and `after` as each call returns.
    A mark names the phase that ends there ("category: what")."""
    fn, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        if before and not calls:
            mark(before)
        calls.append(1)
        out = fn(*args, **kwargs)
        if after:
            mark(after)
        return out

    setattr(owner, name, wrapped)


def ours(config: str, out: str) -> None:
    """`gptcore prepare CONFIG --out OUT`, through the CLI's own entry point."""
    import gptcore.cli as cli

    mark("imports: gptcore.cli, typer")
    import gptcore.data.sharding as sharding  # what prepare_cmd imports first (here before typer parses: same cost)

    mark("imports: gptcore.data, numpy")
    from gptcore import tokenizer as tok_mod
    from gptcore.tokenizer.bpe_tokenizer import BPETokenizer

    wrap(cli, "_load_config", None, "CLI and config: typer, pydantic, YAML")
    wrap(tok_mod, "gpt2_tokenizer", "documents: stdlib walk, first file", "vocabulary: GPT-2 files -> ranks")
    wrap(BPETokenizer, "save", None, "outputs: tokenizer.json (sha256, write)")
    wrap(BPETokenizer, "to_tiktoken", None, "encoding: tiktoken Encoding from the ranks")
    wrap(sharding, "_workers", "outputs: first manifest")
    wrap(sharding._SplitWriter, "finish", "encode loop: read, hash, encode (threads), write")
    wrap(sharding, "prepare_shards", None, "outputs: last shards, final manifest")
    sys.argv = ["gptcore", "prepare", config, "--out", out]
    try:
        cli.app()
    finally:
        mark("exit: summary, atexit")


def peer(out: str, max_bytes: str, nprocs: str) -> None:
    """benchmarks/_llmc_fineweb.py's main, as its own process would run it."""
    import importlib.util
    import multiprocessing

    import numpy  # noqa: F401
    import tiktoken
    import tiktoken.load

    import gptcore.data.sources  # noqa: F401  (the recipe's document stream)

    mark("imports: numpy, tiktoken, multiprocessing")
    wrap(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", None, "vocabulary: GPT-2 files -> ranks")
    wrap(tiktoken, "Encoding", None, "encoding: tiktoken Encoding from the ranks")
    wrap(multiprocessing, "Pool", None, "workers: Pool forks NPROCS processes")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_llmc_fineweb.py")
    spec = importlib.util.spec_from_file_location("_llmc_fineweb", path)
    mod = sys.modules["_llmc_fineweb"] = importlib.util.module_from_spec(spec)  # the Pool pickles its functions by name
    spec.loader.exec_module(mod)
    wrap(mod, "write_datafile", "encode loop: read, encode (Pool.imap), copy", "outputs: shard written")
    try:
        mod.main(out, int(max_bytes), int(nprocs))
    finally:
        mark("exit: pool closed, atexit")


if __name__ == "__main__":
    mark("interpreter start")
    {"ours": ours, "peer": peer}[sys.argv[2]](*sys.argv[3:])
