"""The readable BPE trainer — minbpe's loop, kept beside the fast one so a learner sees the idea first.

Training BPE is one loop: count every adjacent pair of ids in every chunk, merge the most frequent
pair into a new id, repeat. This file does exactly that and nothing more, recounting all pairs at
every merge (O(merges × corpus)); `gptcore.tokenizer.train.train_merges` learns the same merges by
updating the counts incrementally, and the tests prove the two agree merge for merge.

    >>> train_reference(["aaab"], 2, r"\\w+")
    [(97, 97), (97, 98)]

Rules shared with the fast trainer (and so with our tokenizer files):
- the text is cut into chunks by the split regex first, and special tokens are cut out: merges
  never cross a chunk boundary;
- ties between equally frequent pairs go to the smallest (left id, right id);
- a pair whose bytes already form a token is never merged again (no duplicate tokens).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import regex


def get_stats(ids: Sequence[int], counts: dict | None = None) -> dict[tuple[int, int], int]:
    """Count adjacent pairs: get_stats([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}"""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` by `new_id`: merge([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]"""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_reference(texts: Iterable[str], num_merges: int, pattern: str, specials: Sequence[str] = ()) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges; merge i = (left id, right id) makes id 256 + i."""
    words = []
    for text in texts:
        for s in specials:
            text = text.replace(s, "\0SPLIT\0")
        for part in text.split("\0SPLIT\0"):
            words += [list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, part)]
    vocab = [bytes([i]) for i in range(256)]
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        stats: dict[tuple[int, int], int] = {}
        for w in words:
            get_stats(w, stats)
        candidates = [(-c, p) for p, c in stats.items() if vocab[p[0]] + vocab[p[1]] not in vocab]
        if not candidates:
            break
        _, pair = min(candidates)  # highest count; ties -> smallest pair
        new_id = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        merges.append(pair)
        words = [merge(w, pair, new_id) for w in words]
    return merges
