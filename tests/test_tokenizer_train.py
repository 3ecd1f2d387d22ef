"""The fast trainer against the readable reference below (minbpe-style: recount every pair at every
merge), plus streaming input, determinism, vocab_size accounting and consistency with tiktoken."""

import random

import pytest

from gptcore.tokenizer.reference import train_reference

from gptcore.tokenizer.train import count_chunks_parallel, train_merges
from gptcore.errors import ConfigError, DataError
from gptcore.tokenizer import PATTERNS, BPETokenizer


SMALL_CORPORA = [
    ["aaaaaaaa aaaa aaa aa a"],
    ["abababab abab ab aba bab", "ba ba ba abba"],
    ["def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n" * 3],
    ["the cat sat on the mat. the cat ate the rat! THE CAT? 12345 123 12 1"],
    ["héllo wörld 😀😀😀 中文中文中文 e\u0301e\u0301e\u0301 \t\t\t\n\n\r\n"],
]


def _random_corpus(seed):
    rng = random.Random(seed)
    alphabet = "aab bc  d\n\t'sé😀xyz0123.,"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(rng.randint(1, 8))]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
@pytest.mark.parametrize("corpus", SMALL_CORPORA + [_random_corpus(s) for s in range(12)])
def test_merges_equal_naive_reference(corpus, pattern):
    pat = PATTERNS[pattern]
    tok = BPETokenizer.train(corpus, vocab_size=256 + 60 + 1, pattern=pattern)
    assert tok.merges == train_reference(corpus, 60, pat, specials=("<|endoftext|>",))


def test_merges_equal_naive_on_real_python_source():
    import inspect

    import gptcore.tokenizer.train as mod

    src = inspect.getsource(mod)[:12000]
    tok = BPETokenizer.train(src, vocab_size=256 + 150 + 1)
    assert tok.merges == train_reference([src], 150, PATTERNS["gpt4"])


def test_duplicate_bytes_are_never_merged():
    # "ab"+"c" and "a"+"bc" both spell "abc": the second pair must be skipped
    corpus = ["bc bc bc bc abc abc abc abc ab ab"]
    merges = train_merges({"abc": 4, "bc": 4, "ab": 2}, 10)
    assert merges == train_reference([c for c in ["abc"] * 4 + ["bc"] * 4 + ["ab"] * 2], 10, r"\S+")
    tok = BPETokenizer.train(corpus, 300, pattern=r"\S+")
    spelled = [tok.token_bytes(i) for i in range(256 + len(tok.merges))]
    assert len(set(spelled)) == len(spelled)


def test_stream_input_and_specials_cut_out():
    docs = [f"doc {i}: x = {i} * y<|endoftext|>" for i in range(50)]
    a = BPETokenizer.train(iter(docs), vocab_size=300)
    b = BPETokenizer.train("".join(docs), vocab_size=300)
    assert a.merges == b.merges
    assert not any(b"<|" in a.token_bytes(i) for i in range(256 + len(a.merges)))
    assert a.special_tokens == {"<|endoftext|>": 299}
    assert a.encode("y<|endoftext|>", allowed_special="all")[-1] == 299


def test_vocab_size_accounting_and_errors():
    tok = BPETokenizer.train("hello hello world " * 20, vocab_size=260, special_tokens=("<|a|>", "<|b|>"))
    assert len(tok.merges) == 2 and tok.vocab_size == 260
    assert tok.special_tokens == {"<|a|>": 258, "<|b|>": 259}
    with pytest.raises(ConfigError, match="vocab_size"):
        BPETokenizer.train("hello", vocab_size=256)
    with pytest.raises(DataError):
        BPETokenizer.train([], vocab_size=300)
    with pytest.raises(ConfigError, match="pattern"):
        BPETokenizer.train("x", vocab_size=300, pattern="([unclosed")
    small = BPETokenizer.train("ab", vocab_size=1000)  # runs out of pairs: a smaller vocabulary
    assert small.merges == [(97, 98)] and small.vocab_size == 258


def test_trained_tokenizer_roundtrip_and_tiktoken(tmp_path):
    text = open(__file__, encoding="utf-8").read()
    tok = BPETokenizer.train(text, vocab_size=600)
    sample = text[:3000] + " unseen: ☃ \x00 中文 \r\n"
    ids = tok.encode(sample, allowed_special="none")
    assert tok.decode(ids) == sample
    assert tok.to_tiktoken().encode(sample, disallowed_special=()) == ids  # tiktoken's encoder agrees with ours
    tok.save(tmp_path / "t")
    back = BPETokenizer.load(tmp_path / "t")
    assert back.encode(sample, allowed_special="none") == ids and back.sha256 == tok.sha256


def test_training_is_deterministic():
    corpus = _random_corpus(99) * 3
    a = BPETokenizer.train(corpus, 400)
    b = BPETokenizer.train(list(reversed(corpus)), 400)
    assert a.merges == b.merges and a.sha256 == b.sha256


@pytest.mark.slow
def test_merges_equal_naive_on_larger_corpus():
    import glob
    import os
    import sysconfig

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    tok = BPETokenizer.train(texts, vocab_size=256 + 300 + 1, pattern="gpt2")
    assert tok.merges == train_reference(texts, 300, PATTERNS["gpt2"])


def test_stream_memory_grows_with_distinct_chunks_not_corpus():
    import tracemalloc

    import gptcore.tokenizer.bpe_tokenizer as mod

    doc = (open(mod.__file__, encoding="utf-8").read() * 8)[:70_000]  # 70 kB of Python

    def peak(copies):
        tracemalloc.start()
        BPETokenizer.train((doc[:] + str(i % 3) for i in range(copies)), vocab_size=300, num_proc=1)
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    small, big = peak(4), peak(60)  # 15x more text, same distinct chunks
    assert big < 1.5 * small + 200_000, (small, big)
    assert big < 0.5 * 60 * len(doc)  # below what merely holding the stream would take


def test_parallel_chunk_counts_equal_regex_findall_and_memory_stays_bounded():
    """Worker processes count batches of the stream: the sum equals one Counter over regex.findall
    of every text, and the parent never holds more than a few batches of the 4.2 MB stream."""
    import tracemalloc
    from collections import Counter

    import regex

    import gptcore.tokenizer.bpe_tokenizer as mod

    doc = (open(mod.__file__, encoding="utf-8").read() * 8)[:70_000]

    def texts(copies):
        return (doc[:] + f" x{i % 7} <|endoftext|>" for i in range(copies))

    def count(copies):
        tracemalloc.start()
        got = count_chunks_parallel(texts(copies), PATTERNS["gpt4"], ["<|endoftext|>"], num_proc=2, batch_chars=100_000)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return got, peak

    (got, small), (_, big) = count(20), count(80)  # 1.4 MB and 5.6 MB of text
    split = regex.compile(PATTERNS["gpt4"])
    assert got == Counter(c for t in texts(20) for part in t.split("<|endoftext|>") for c in split.findall(part))
    assert big < 1.5 * small + 200_000, (small, big)  # 4x the text, about the same memory
    assert big < 0.5 * 80 * len(doc), big  # below what merely holding the stream would take


def test_training_merges_do_not_depend_on_worker_processes():
    texts = [t * 3 for t in SMALL_CORPORA[2] + SMALL_CORPORA[4]] * 20
    serial = BPETokenizer.train(texts, vocab_size=400, num_proc=1).merges
    assert serial == train_reference(texts, 400 - 257, PATTERNS["gpt4"])
    import gptcore.tokenizer.train as train_mod

    small_batches = train_mod._batches
    train_mod._batches = lambda t, n: small_batches(t, 500)  # many batches: the parallel path
    try:
        assert BPETokenizer.train(texts, vocab_size=400, num_proc=2).merges == serial
    finally:
        train_mod._batches = small_batches


def _random_histogram(seed):
    """Chunks over a tiny alphabet (runs like "aaaa" and "abab", many equal counts: ties), some
    non-ASCII bytes, counts from 1 to 5: the cases where merge order and overlaps matter."""
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "aab", "abcé"])
    hist = {}
    for _ in range(rng.randint(1, 30)):
        chunk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        hist[chunk] = rng.randint(1, 5)
    return hist


@pytest.mark.parametrize("seed", range(40))
def test_train_merges_equal_naive_reference_on_random_histograms(seed):
    hist = _random_histogram(seed)
    texts = [" ".join(c for c, n in hist.items() for _ in range(n))]
    want = train_reference(texts, 80, r"\S+")
    assert train_merges(hist, 80) == want
    assert train_merges({c.encode(): n for c, n in hist.items()}, 80) == want  # bytes keys too


def test_train_merges_ties_and_no_duplicate_tokens():
    # (a, b) and (b, c) tie first (the smaller pair wins), and no two tokens spell the same bytes.
    # Note: the "never merge a pair whose bytes already form a token" branch was not reached by any
    # histogram we tried (20,000 random ones, and 25 MB of Python with 32,511 merges): disabling it
    # changes no merge list there, so no test here can prove that branch; this one pins the property.
    hist = {"abc": 3, "ab": 1, "bc": 1, "abcabc": 2}
    merges = train_merges(hist, 20)
    assert merges == train_reference([" ".join(c for c, n in hist.items() for _ in range(n))], 20, r"\S+")
    spelled = [bytes([i]) for i in range(256)]
    for a, b in merges:
        spelled.append(spelled[a] + spelled[b])
    assert len(set(spelled)) == len(spelled)


def _whitespace_heavy_text(seed):
    """Text where line cuts could go wrong: blank lines, \\r\\n, trailing spaces, Unicode spaces
    (\\x0b \\x85 \\u2028 \\xa0 \\u3000), indentation, punctuation before newlines, lines repeated."""
    rng = random.Random(seed)
    atoms = ["\n", "\r\n", "\r", "  ", "\t", " ", "\x0b", "\x85", "\u2028", "\xa0", "\u3000", "x", "ab", "Été",
             "12345", "'s", "'LL", "(", "):", "==", "😀", "中文", "    return x", "\n    ", "\n\n", "  \n"]
    lines = ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(1, 12))]
    return "\n".join(rng.choice(lines) for _ in range(rng.randint(1, 60)))


@pytest.mark.parametrize("seed", range(30))
def test_line_cut_counts_equal_plain_findall(seed):
    """gpt4's line cut (gptcore/tokenizer/patterns.py) gives exactly regex.findall's chunks, and is used."""
    from collections import Counter

    import regex

    from gptcore.tokenizer.patterns import LINE_CUTS
    from gptcore.tokenizer.train import count_chunks

    texts = [_whitespace_heavy_text(seed * 3 + i) for i in range(3)] + ["<|endoftext|>\n  a\nb<|endoftext|>"]
    split = regex.compile(PATTERNS["gpt4"])
    want = Counter(c for t in texts for part in t.split("<|endoftext|>") for c in split.findall(part))
    assert count_chunks(texts, split, ["<|endoftext|>"]) == want
    assert PATTERNS["gpt4"] in LINE_CUTS and PATTERNS["gpt2"] not in LINE_CUTS


def test_line_cut_counts_repeated_lines_once_on_real_source():
    """On real Python the pieces between cuts repeat, so findall sees fewer characters than the text
    holds, and the counts are still exactly findall's over the whole text."""
    import glob
    import os
    import sysconfig
    from collections import Counter

    import regex

    from gptcore.tokenizer.train import count_chunks

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files] * 2
    split = regex.compile(PATTERNS["gpt4"])
    seen = []

    class Counting:  # the compiled pattern, noting how many characters findall is given
        pattern = split.pattern

        def findall(self, s):
            seen.append(len(s))
            return split.findall(s)

    assert count_chunks(texts, Counting()) == Counter(c for t in texts for c in split.findall(t))
    assert sum(seen) < 0.6 * sum(map(len, texts))


def test_train_merges_token_ids_past_the_surrogates_and_65535():
    """Words hold token ids as characters: ids 0xD800-0xDFFF (lone surrogates) and above 65535 must
    work like any other. Every 2-byte word once, counts falling with (first byte, second byte), so
    the merges are the byte pairs in that order; then the 4-byte word's two halves, ids > 65535."""
    hist = {bytes([i, j]): 1_000_000 - (i * 256 + j) for i in range(256) for j in range(256)}
    hist[b"\xfe\xff\xff\xfe"] = 1  # adds a tie to (fe, ff) and (ff, fe): each still comes right after its peer
    want = [(i, j) for i in range(256) for j in range(256)] + [(256 + 0xFEFF, 256 + 0xFFFE)]
    assert train_merges(hist, 70_000) == want
