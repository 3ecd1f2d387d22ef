"""Tokenizer training at scale: vocab 32,768 on ~100 MB of Python, ours vs HF `tokenizers` vs sentencepiece.

    .venv/bin/python benchmarks/tokenizer_scale.py                    # 25 MB and 100 MB, vocab 32768
    .venv/bin/python benchmarks/tokenizer_scale.py --mb 5,20          # quicker
    .venv/bin/python benchmarks/tokenizer_scale.py --distinct-mb 25 --trainers ours   # 25 MB, then repeated

The corpus is this interpreter's site-packages `.py` files (sorted by path), distinct text, read
file by file as a stream by each trainer (nobody gets the corpus in memory from us); when they hold
fewer bytes than asked, the stream starts over (repeated text: same distinct chunks, more counts)
and the table says so. Each trainer runs in a fresh process, one after the other at each size, and
reports wall time and peak RSS (ours: the main process, and the largest of its counting workers).
  * ours: `count_chunks_parallel` (2 worker processes) + `train_merges`, i.e. `BPETokenizer.train`
  * HF: BpeTrainer with the same gpt4 split (Split(isolated) + ByteLevel without its regex), all threads
  * sentencepiece: BPE, the settings `SentencePieceTokenizer.train` uses but `num_threads` = cores;
    it holds every sentence in memory, so it runs only up to `--sp-max-mb`
Prints a markdown table and `summary:` rows for `make bench`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GPTCORE_PROGRESS", "0")
os.environ["TOKENIZERS_PARALLELISM"] = "true"


def files() -> list[str]:
    root = Path(sysconfig.get_paths()["purelib"])
    return sorted(str(p) for p in root.rglob("*.py"))


DISTINCT_MB = float(os.environ.get("TOKENIZER_SCALE_DISTINCT_MB", "0"))  # 0: all files; set by --distinct-mb


def texts(mb: float, stats: dict | None = None):
    """Distinct .py files up to `mb` megabytes of UTF-8, read one at a time; repeated if there are too
    few (or once `DISTINCT_MB` of distinct text has been read)."""
    n, rounds, paths = 0, 0, files()
    while n < mb * 1e6:
        rounds += 1
        start = n
        for f in paths:
            if DISTINCT_MB and n - start >= DISTINCT_MB * 1e6:
                break
            try:
                t = Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield t
            n += len(t.encode("utf-8"))
            if n >= mb * 1e6:
                break
    if stats is not None:
        stats.update(bytes=n, rounds=rounds)


def _rss(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def _ours(mb, vocab, out):
    from gptcore.tokenizer import PATTERNS
    from gptcore.tokenizer.bpe_tokenizer import BPETokenizer
    from gptcore.tokenizer.train import count_chunks_parallel, train_merges

    stats, first = {}, []
    t0, c0 = time.perf_counter(), time.process_time()
    counts = count_chunks_parallel(texts(mb, stats), PATTERNS["gpt4"], ["<|endoftext|>"], num_proc=os.cpu_count())
    t1, c1 = time.perf_counter(), time.process_time()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    merges = train_merges(counts, vocab - 257, progress=lambda n: first or first.append(time.perf_counter()))
    tok = BPETokenizer.from_merges(merges, PATTERNS["gpt4"], {"<|endoftext|>": 256 + len(merges)})
    t2 = time.perf_counter()
    # the profile of what remains: counting = reading the stream (this process) + the workers' regex
    # and Counter work; merges = the index (words, pair counts, `where`, heap; up to the first merge) + the loop
    out.update(wall=t2 - t0, count_s=t1 - t0, merges_s=t2 - t1, distinct=len(counts), vocab=tok.vocab_size,
               workers_rss=_rss(resource.RUSAGE_CHILDREN), parent_cpu=c1 - c0,
               workers_cpu=workers.ru_utime + workers.ru_stime, index_s=first[0] - t1, **stats)


def _hf(mb, vocab, out):
    from tokenizer import _train_hf  # benchmarks/tokenizer.py's: the same split and BpeTrainer settings

    t0 = time.perf_counter()
    v = _train_hf(texts(mb), vocab)
    out.update(wall=time.perf_counter() - t0, vocab=v)


def _sp(mb, vocab, out):
    import io

    import sentencepiece as spm

    def lines():
        for t in texts(mb):
            for line in t.split("\n"):
                if line.strip():
                    yield line[:8192]

    t0 = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=io.BytesIO(), model_type="bpe", vocab_size=vocab,
            byte_fallback=True, control_symbols=["<|endoftext|>"], normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, unk_id=0, bos_id=-1,
            eos_id=-1, pad_id=-1, hard_vocab_limit=False, character_coverage=0.9995, max_sentence_length=1 << 15,
            num_threads=os.cpu_count(), minloglevel=2, logstream=devnull)
    out.update(wall=time.perf_counter() - t0, vocab=vocab)


def _child(name, mb, vocab, q):
    out = {"base_rss": _rss(resource.RUSAGE_SELF)}
    {"ours": _ours, "hf": _hf, "sp": _sp}[name](mb, vocab, out)
    out["rss"] = _rss(resource.RUSAGE_SELF)
    q.put(out)


def run(name, mb, vocab) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, mb, vocab, q))
    load = os.getloadavg()[0]
    p.start()
    out = q.get()
    p.join()
    return {**out, "load": load}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cli import cli_args, summary

    args = cli_args(__doc__.splitlines()[0], mb="25,100", vocab=32768, sp_max_mb=25.0, distinct_mb=0.0,
                    trainers="ours,hf,sp")
    os.environ["TOKENIZER_SCALE_DISTINCT_MB"] = str(args.distinct_mb)  # the spawned trainers read it
    sizes = [float(s) for s in args.mb.split(",")]
    total = sum(Path(f).stat().st_size for f in files())
    print(f"corpus: site-packages .py files of {sys.executable} ({total / 1e6:.0f} MB on disk), sorted, streamed; "
          f"vocab {args.vocab}, gpt4 split; {os.cpu_count()} cores\n")
    print("| corpus | trainer | wall | ratio to HF | peak RSS | distinct chunks | phases | load avg |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    res = {}
    for mb in sizes:
        names = [t for t in args.trainers.split(",") if t != "sp" or mb <= args.sp_max_mb]
        for name in names:
            res[mb, name] = run(name, mb, args.vocab)
        o = res[mb, "ours"]
        h = res.get((mb, "hf"), {"wall": float("nan")})
        text = f"{o['bytes'] / 1e6:.0f} MB" + (" distinct" if o["rounds"] == 1 else f", {o['rounds']}x repeated")
        label = {"ours": "ours (2 counting processes + pure-Python merges)", "hf": "HF tokenizers BpeTrainer",
                 "sp": "sentencepiece BPE"}
        for name in names:
            r = res[mb, name]
            rss = f"{r['rss']:.0f} MB"
            if name == "ours":
                rss += f" (+ workers {r['workers_rss']:.0f} MB each)"
            phases = (f"count {r['count_s']:.1f} s (CPU: reader {r['parent_cpu']:.1f} s, workers {r['workers_cpu']:.1f} s), "
                      f"merges {r['merges_s']:.1f} s (index {r['index_s']:.1f} s)") if name == "ours" else ""
            distinct = f"{r['distinct']:,}" if name == "ours" else ""
            ratio = f"{r['wall'] / h['wall']:.2f}x" if h["wall"] == h["wall"] else ""  # blank without HF
            print(f"| {text} | {label[name]} | {r['wall']:.1f} s | {ratio} | {rss} | {distinct} | "
                  f"{phases} | {r['load']:.1f} |")
    big, small = max(sizes), min(sizes)
    print()
    if "hf" not in args.trainers:  # ours alone: the memory figures
        summary("tokenizer", f"training peak RSS (main process) at {small:.0f} / {big:.0f} MB, "
                f"{args.distinct_mb:.0f} MB distinct text then repeated",
                f"{res[small, 'ours']['rss']:.0f} / {res[big, 'ours']['rss']:.0f} MB")
        return
    o, h = res[big, "ours"], res[big, "hf"]
    summary("tokenizer", f"BPE training, vocab {args.vocab}, {o['bytes'] / 1e6:.0f} MB of Python, vs HF BpeTrainer",
            f"{o['wall'] / h['wall']:.2f}x HF's time ({o['wall']:.1f} s vs {h['wall']:.1f} s, load {o['load']:.1f})")
    if len(sizes) > 1:
        s = res[small, "ours"]
        summary("tokenizer", f"training peak RSS (main process) at {small:.0f} / {big:.0f} MB, ours vs HF",
                f"{s['rss']:.0f} / {o['rss']:.0f} MB vs {res[small, 'hf']['rss']:.0f} / {h['rss']:.0f} MB")


if __name__ == "__main__":
    main()
