"""Training a byte-level BPE vocabulary fast, in plain Python.

The readable algorithm (minbpe, and `naive_train` in tests/test_tokenizer_train.py) is:

    repeat vocab_size - 256 times:
        count every adjacent pair of tokens in the corpus       # O(corpus) per merge
        merge the most frequent pair into a new token everywhere

This module computes exactly the same merges, but

1. splits the text into pre-token chunks once (the regex) and counts each distinct chunk:
   "    return" occurring 40 000 times is one word with count 40 000. Memory grows with the
   number of distinct chunks, not with the corpus, so `texts` can be a stream;
2. keeps the pair counts between merges and updates them only for the words the merged pair
   occurs in (`where[pair]` = ids of those words), only around each merged position;
3. picks the best pair from a heap with lazy deletion: counts of existing pairs only ever go
   down (a merge creates new pairs, all containing the new token), so a popped entry whose
   count is stale is pushed back with its current count, and the first fresh entry is the max.

Pairs are ints `a << 20 | b` (token ids < 2**20), words are lists of ints; the heap holds single
ints `pair - (count << 40)`, so the smallest key is the highest count and, among equal counts,
the smallest pair `(a, b)`.

Tie-break (deterministic, and the naive reference uses the same rule): the highest count wins;
among equal counts the pair with the smallest (left id, right id). A pair whose concatenated bytes
already form a token (e.g. "a"+"bc" after "ab"+"c" made "abc") is never merged, so every token's
bytes are distinct and the vocabulary is a bytes -> rank map, exactly what tiktoken encodes with.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import Counter, deque
from typing import Iterable, Iterator

_SHIFT = 20  # pair key = a << 20 | b
_MASK = (1 << _SHIFT) - 1
_CSHIFT = 40  # heap key = pair - (count << 40)
_PMASK = (1 << _CSHIFT) - 1


def count_chunks(texts: Iterable[str], split, specials: Iterable[str] = (), progress=None) -> Counter:
    """Count the regex chunks of a stream of texts: {chunk string: occurrences}.

    `split` is a compiled pattern; special-token texts are cut out first so they are never learned.
    `progress(n)` is called with each text's length in characters.

        >>> count_chunks(["ab ab"], regex.compile(r" ?\\w+"))
        Counter({'ab': 1, ' ab': 1})
    """
    counts: Counter = Counter()
    specials = [s for s in specials if s]
    findall = split.findall
    for text in texts:
        parts = [text]
        for s in specials:
            if s in text:
                parts = [q for p in parts for q in p.split(s)]
        for part in parts:
            counts.update(findall(part))
        if progress is not None:
            progress(len(text))
    return counts


def count_chunks_parallel(texts: Iterable[str], pattern: str, specials: Iterable[str] = (), num_proc: int | None = None,
                          progress=None, batch_chars: int = 1 << 22) -> Counter:
    """`count_chunks` across `num_proc` worker processes (default: every core), streamed.

    The stream is cut into batches of ~`batch_chars` characters; each is counted in a worker and
    the histograms summed here. At most two batches per worker are in flight, so memory holds the
    distinct chunks and a few batches, never the corpus. A stream shorter than two batches (and
    num_proc 1, or a call from a daemonic worker, which may not start processes) is counted here.
    The sum does not depend on how the stream was cut, so the merges are the same either way.
    """
    import multiprocessing as mp

    import regex

    specials = tuple(s for s in specials if s)
    n = num_proc or os.cpu_count() or 1
    if n <= 1 or mp.current_process().daemon:
        return count_chunks(iter_texts(texts), regex.compile(pattern), specials, progress)
    batches = _batches(iter_texts(texts), batch_chars)
    head = list(itertools.islice(batches, 2))
    if len(head) < 2:
        return count_chunks(itertools.chain.from_iterable(head), regex.compile(pattern), specials, progress)
    stream = itertools.chain(head, batches)
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counts: Counter = Counter()
    pending: deque = deque()

    def collect() -> None:
        chunk_counts, chars = pending.popleft().result()
        counts.update(chunk_counts)
        if progress is not None:
            progress(chars)

    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_counter, initargs=(pattern, specials)) as pool:
        for batch in stream:
            pending.append(pool.submit(_count_batch, batch))
            if len(pending) >= 2 * n:
                collect()
        while pending:
            collect()
    return counts


def _batches(texts: Iterator[str], batch_chars: int) -> Iterator[list[str]]:
    """Consecutive lists of texts of at least `batch_chars` characters each (the last one may be shorter)."""
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_COUNTER: dict = {}


def _init_counter(pattern: str, specials: tuple[str, ...]) -> None:
    import regex

    _COUNTER["split"], _COUNTER["specials"] = regex.compile(pattern), specials


def _count_batch(batch: list[str]) -> tuple[Counter, int]:
    return count_chunks(batch, _COUNTER["split"], _COUNTER["specials"]), sum(map(len, batch))


def train_merges(
    chunk_counts: dict[str, int] | dict[bytes, int],
    num_merges: int,
    progress=None,
) -> list[tuple[int, int]]:
    """The first `num_merges` BPE merges of a chunk histogram, as (left id, right id) pairs.

    Token ids 0..255 are the bytes; merge i creates token 256 + i. `progress(n)` is called per merge.

        >>> train_merges({"aaab": 2, "ab": 1}, 2)
        [(97, 97), (97, 98)]
    """
    # distinct chunks -> words (lists of byte ids) and their counts
    words: list[list[int]] = []
    wcount: list[int] = []
    for chunk, c in chunk_counts.items():
        b = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        if len(b) >= 2:
            words.append(list(b))
            wcount.append(c)

    # pair -> total count; pair -> ids of the words it occurs in (a superset, checked on use: a list,
    # a word id appended once per run of additions, so a word rarely appears twice and a repeat is a no-op)
    counts: dict[int, int] = {}
    where: dict[int, list] = {}
    for wi, w in enumerate(words):
        c = wcount[wi]
        for x, y in zip(w, w[1:]):
            k = x << _SHIFT | y
            counts[k] = counts.get(k, 0) + c
            _add_where(where, k, wi)
    heap = [k - (c << _CSHIFT) for k, c in counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([i]) for i in range(256)]
    known = set(token_bytes)
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        key = heapq.heappop(heap)
        pair = key & _PMASK
        c = -(key >> _CSHIFT)
        now = counts.get(pair, 0)
        if now <= 0:
            continue
        if now != c:  # stale: push back with the current count
            heapq.heappush(heap, pair - (now << _CSHIFT))
            continue
        a, b = pair >> _SHIFT, pair & _MASK
        new_bytes = token_bytes[a] + token_bytes[b]
        if new_bytes in known:  # would duplicate a token: never merge this pair
            del counts[pair]
            continue
        z = len(token_bytes)
        token_bytes.append(new_bytes)
        known.add(new_bytes)
        merges.append((a, b))
        _apply_merge(words, wcount, counts, where, heap, a, b, z)
        if progress is not None:
            progress(1)
    return merges


def _apply_merge(words, wcount, counts, where, heap, a, b, z) -> None:
    """Replace (a, b) by z in every word that holds it; update the counts around each merge site."""
    pair = a << _SHIFT | b
    touched: set[int] = set()  # new pairs (all contain z): pushed once, with their final count
    get = counts.get
    for wi in where.pop(pair, ()):
        w = words[wi]
        if a not in w:  # a stale entry: the word lost the pair to an earlier merge
            continue
        n = len(w)
        c = wcount[wi]
        i = w.index(a)  # list.index and slices skip the stretches without `a` at C speed
        out: list[int] = w[:i]
        while True:  # here w[i] == a
            if i + 1 < n and w[i + 1] == b:
                if out:  # left neighbour: (p, a) -> (p, z); p may be a z made just before
                    p = out[-1]
                    k = p << _SHIFT | a
                    counts[k] = get(k, 0) - c
                    k = p << _SHIFT | z
                    counts[k] = get(k, 0) + c
                    touched.add(k)
                    _add_where(where, k, wi)
                if i + 2 < n:  # right neighbour: (b, q) -> (z, q)
                    q = w[i + 2]
                    k = b << _SHIFT | q
                    counts[k] = get(k, 0) - c
                    k = z << _SHIFT | q
                    counts[k] = get(k, 0) + c
                    touched.add(k)
                    _add_where(where, k, wi)
                out.append(z)
                i += 2
            else:
                out.append(a)
                i += 1
            if a not in w[i:]:
                out += w[i:]
                break
            j = w.index(a, i)
            out += w[i:j]
            i = j
        if len(out) != n:
            words[wi] = out
    counts.pop(pair, None)
    for k in touched:
        c = counts.get(k, 0)
        if c > 0:
            heapq.heappush(heap, k - (c << _CSHIFT))


def _add_where(where, k, wi) -> None:
    s = where.get(k)
    if s is None:
        where[k] = [wi]
    elif s[-1] != wi:
        s.append(wi)


def iter_texts(texts) -> Iterator[str]:
    """`texts` as a stream of strings: a single str is one text."""
    if isinstance(texts, str):
        yield texts
    else:
        yield from texts
