"""Training a byte-level BPE vocabulary fast, in Python (numpy only builds the first pair index).

The readable algorithm (minbpe, and `train_reference` in tokenizer/reference.py) is:

    repeat vocab_size - 256 times:
        count every adjacent pair of tokens in the corpus       # O(corpus) per merge
        merge the most frequent pair into a new token everywhere

This module computes exactly the same merges, but

1. splits the text into pre-token chunks once (the regex) and counts each distinct chunk:
   "    return" occurring 40 000 times is one word with count 40 000. Memory grows with the
   number of distinct chunks, not with the corpus, so `texts` can be a stream. Where the pattern
   has a safe line cut (tokenizer/patterns.py `LINE_CUTS`), each batch first counts its lines and
   splits each distinct line once (on Python source, findall then sees ~60% of the text);
2. keeps the pair counts between merges and updates them only for the words the merged pair
   occurs in (`where[pair]` = ids of those words), only around each merged position;
3. picks the best pair from a heap with lazy deletion: counts of existing pairs only ever go
   down (a merge creates new pairs, all containing the new token), so a popped entry whose
   count is stale is pushed back with its current count, and the first fresh entry is the max.

A word is a `str` whose characters are its token ids (`chr(id)`; the bytes decode as latin-1 to
chars 0..255), so merging a pair everywhere in a word is `str.replace` (left to right, without
overlaps, like the reference's `merge`) and finding it is `in` / `str.find`, all in C; a pair is
the 2-character string of its two tokens. The heap holds `(-count, pair)`: the smallest entry is
the highest count and, among equal counts, the smallest pair, because strings compare by code
point, i.e. by (left id, right id).

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

from gptcore.tokenizer.patterns import LINE_CUTS


def count_chunks(texts: Iterable[str], split, specials: Iterable[str] = (), progress=None, cut=None) -> Counter:
    """Count the regex chunks of a stream of texts: {chunk string: occurrences}.

    `split` is a compiled pattern; special-token texts are cut out first so they are never learned.
    `cut` (default: `LINE_CUTS` of the pattern, if any) is a compiled regex of safe cuts: the pieces
    between them are counted as a histogram first, and each distinct piece is split once, with its
    count, so a line repeated 40 times is matched once. `progress(n)` is called with each text's
    length in characters.

        >>> count_chunks(["ab ab"], regex.compile(r" ?\\w+"))
        Counter({'ab': 1, ' ab': 1})
    """
    import regex

    if cut is None and split.pattern in LINE_CUTS:
        cut = regex.compile(LINE_CUTS[split.pattern])
    counts: Counter = Counter()
    pieces: Counter = Counter()  # line pieces (without their cut "\n") -> occurrences
    specials = [s for s in specials if s]
    findall = split.findall
    for text in texts:
        parts = [text]
        for s in specials:
            if s in text:
                parts = [q for p in parts for q in p.split(s)]
        for part in parts:
            cuts = cut.split(part) if cut is not None else ()
            if len(cuts) < 2:
                counts.update(findall(part))
                continue
            counts.update(findall(cuts[0] + "\n"))  # the first piece may start anywhere: alone
            pieces.update(cuts[1:-1])
            counts.update(findall(cuts[-1]))  # the last has no "\n" of its own
        if progress is not None:
            progress(len(text))
    _count_pieces(pieces, findall, counts)
    return counts


def _count_pieces(pieces: Counter, findall, counts: Counter) -> None:
    """Add the chunks of every piece, times its count. Pieces of equal count are joined (each with its
    "\n" back: every cut is safe, so the joined text's chunks are theirs) and split in one call."""
    by_count: dict[int, list[str]] = {}
    for piece, k in pieces.items():
        by_count.setdefault(k, []).append(piece)
    for k, group in by_count.items():
        for i in range(0, len(group), 1024):  # ~50 kB of text at a time: the chunk lists stay small
            chunks = findall("\n".join(group[i:i + 1024]) + "\n")
            if k == 1:
                counts.update(chunks)
            else:
                for chunk, n in Counter(chunks).items():
                    counts[chunk] += n * k


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
    # distinct chunks -> words (strings of token chars) and their counts
    words: list[str] = []
    wcount: list[int] = []
    for chunk, c in chunk_counts.items():
        b = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        if len(b) >= 2:
            words.append(b.decode("latin-1"))  # byte i -> chr(i)
            wcount.append(c)

    # pair -> total count; pair -> ids of the words it occurs in (a superset, checked on use: a
    # word id is appended at most once in a row, so a word rarely appears twice and a repeat is a no-op)
    counts, where = _pair_index(words, wcount)
    heap = [(-c, k) for k, c in counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([i]) for i in range(256)]
    known = set(token_bytes)
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        c, pair = heapq.heappop(heap)
        now = counts.get(pair, 0)
        if now <= 0:
            continue
        if now != -c:  # stale: push back with the current count
            heapq.heappush(heap, (-now, pair))
            continue
        a, b = ord(pair[0]), ord(pair[1])
        new_bytes = token_bytes[a] + token_bytes[b]
        if new_bytes in known:  # would duplicate a token: never merge this pair
            del counts[pair]
            continue
        z = chr(len(token_bytes))
        token_bytes.append(new_bytes)
        known.add(new_bytes)
        merges.append((a, b))
        _apply_merge(words, wcount, counts, where, heap, pair, z)
        if progress is not None:
            progress(1)
    return merges


def _pair_index(words: list[str], wcount: list[int]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The pair counts and `where` lists of byte words, in numpy: the same as

        for wi, w in enumerate(words):
            for k in map(str.__add__, w, w[1:]):
                counts[k] = counts.get(k, 0) + wcount[wi]
                _add_where(where, k, wi)

    (every word id once per pair, in increasing order) at C speed: 2 M pairs at 100 MB of text.
    """
    import numpy as np

    if not words:
        return {}, {}
    ids = np.frombuffer("".join(words).encode("latin-1"), np.uint8).astype(np.int32)
    wid = np.repeat(np.arange(len(words), dtype=np.int32), np.fromiter(map(len, words), np.int64, len(words)))
    inside = wid[:-1] == wid[1:]  # adjacent positions of one word (wid: the word of each position)
    key, kw = (ids[:-1] << 8 | ids[1:])[inside], wid[:-1][inside]  # pair = left byte << 8 | right byte
    del ids, wid, inside  # int32 and freed early: the index is the trainer's peak of memory
    total = np.bincount(key, weights=np.asarray(wcount, np.float64)[kw], minlength=1 << 16)  # exact below 2**53
    order = np.argsort(key, kind="stable")  # by pair, word ids still increasing
    key, kw = key[order], kw[order]
    first = np.r_[True, (key[1:] != key[:-1]) | (kw[1:] != kw[:-1])]  # each (pair, word) once
    key, kw = key[first], kw[first]
    del order, first
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    pairs = key[starts].tolist()
    names = [chr(k >> 8) + chr(k & 255) for k in pairs]
    counts = dict(zip(names, total[pairs].astype(np.int64).tolist()))
    ints = list(range(len(words)))  # one int object per word id, shared by every list (2 M ints otherwise)
    where = {k: list(map(ints.__getitem__, v.tolist())) for k, v in zip(names, np.split(kw, starts[1:]))}
    return counts, where


def _apply_merge(words, wcount, counts, where, heap, pair, z) -> None:
    """Replace `pair` by the token `z` in every word that holds it; update the counts around each new z.

    `str.replace` merges left to right without overlaps, exactly like the reference's `merge`
    ("aaa" -> z + "a"). Around each z at j in the new word, with a, b = pair:
      left neighbour p = new[j-1]:  (p, a) -> (p, z); when p is z itself, the previous z's right side did it;
      right neighbour q = new[j+1]: (b, q) -> (z, q); when q is z (the word held "abab"): (b, a) -> (z, z).
    """
    a, b = pair
    made: dict[str, list[int]] = {}  # the new pairs (all contain z, so none existed before) -> their words
    get = counts.get
    for wi in where.pop(pair, ()):
        w = words[wi]
        if pair not in w:  # a stale entry: the word lost the pair to an earlier merge
            continue
        c = wcount[wi]
        new = words[wi] = w.replace(pair, z)
        n = len(new)
        j = new.find(z)
        while j >= 0:
            if j and new[j - 1] != z:
                p = new[j - 1]
                k = p + a  # get(): a pair dropped as a duplicate may still sit in words
                counts[k] = get(k, 0) - c
                k = p + z
                counts[k] = get(k, 0) + c
                _add_where(made, k, wi)
            if j + 1 < n:
                q = new[j + 1]
                if q == z:
                    k = b + a
                    counts[k] = get(k, 0) - c
                    k = z + z
                else:
                    k = b + q
                    counts[k] = get(k, 0) - c
                    k = z + q
                counts[k] = get(k, 0) + c
                _add_where(made, k, wi)
            j = new.find(z, j + 1)
    counts.pop(pair, None)
    where.update(made)
    for k in made:  # pushed once each, with the final count
        c = counts[k]
        if c > 0:
            heapq.heappush(heap, (-c, k))


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
