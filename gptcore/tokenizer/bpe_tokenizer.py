"""Byte-level BPE, written from scratch: train, encode, decode, save, and talk to tiktoken.

A tokenizer turns text into integer ids in three steps:

1. cut the text into chunks with a regex (`PATTERNS`), so merges never cross a word/number/space
   boundary: "Hello world!!" -> ["Hello", " world", "!!"];
2. turn each chunk into UTF-8 bytes, ids 0..255 (every string is encodable: no unknown token);
3. merge adjacent parts by rank: repeatedly join the adjacent pair whose concatenated bytes has the
   lowest rank in the vocabulary (leftmost on ties), until no adjacent pair is a token.

Step 3 is exactly tiktoken's rule, so with OpenAI's files we reproduce GPT-2 and cl100k ids bit for
bit. The vocabulary is a map `bytes -> rank` (the rank is the id); training (tokenizer/train.py)
produces it as an ordered list of merges, token 256 + i = merge i, and everything else (the bytes
of each id, the ranks) is derived from those merges, so saved state cannot drift.

    tok = BPETokenizer.train(open("corpus.txt").read(), vocab_size=1024)
    ids = tok.encode("def f(x):\\n    return x")
    assert tok.decode(ids) == "def f(x):\\n    return x"
    tok.save("out/tokenizer")            # out/tokenizer/tokenizer.json
    enc = tok.to_tiktoken()              # same ids, at tiktoken speed

`SentencePieceTokenizer` (tokenizer/sp.py) offers the same interface over the sentencepiece
library (BPE with byte fallback); docs/01-tokenizer.md says how it differs.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterable, Sequence

from gptcore.errors import CheckpointError, ConfigError, DataError, GptcoreError
from gptcore.fileio import atomic_write_bytes
from gptcore.tokenizer import formats
from gptcore.tokenizer.patterns import PATTERNS
from gptcore.tokenizer.train import count_chunks_parallel, train_merges
from gptcore.tokenizer.base import (ENDOFTEXT, FORMAT_BPE, FORMAT_SP, VERSION, SpecialTokensMixin,  # noqa: F401
                                    _content_sha, _dump, _dump_with_sha, _fix_surrogates, _read_tokenizer_json)

_CACHE_LIMIT = 1 << 20  # chunk -> ids cache entries kept per tokenizer (cleared when full)
_INF = 1 << 62


def resolve_pattern(pattern: str) -> str:
    """"gpt2" / "gpt4" -> the regex; any other string must itself be a valid regex."""
    pat = PATTERNS.get(pattern, pattern)
    if pat in PATTERNS.values():
        return pat
    import regex  # here, not at import: the tiktoken fast path never needs it (~13 ms)

    try:
        regex.compile(pat)
    except regex.error as exc:
        raise ConfigError(f"invalid split pattern: {exc}", "tokenizer.pattern",
                          'use "gpt2", "gpt4" or a valid regex') from None
    return pat


def bpe(ranks: dict[bytes, int], piece: bytes, max_rank: int | None = None) -> list[bytes]:
    """Split `piece` into tokens: merge the lowest-rank adjacent pair until none is a token.

        >>> bpe({b"a": 0, b"b": 1, b"ab": 2, b"abb": 3}, b"abb")
        [b'abb']
    `max_rank` stops before merges of that rank or higher (used to recover a token's merge pair).
    """
    parts = [piece[i:i + 1] for i in range(len(piece))]
    limit = _INF if max_rank is None else max_rank
    get = ranks.get

    def rank(x: bytes) -> int:
        r = get(x, _INF)
        return r if r < limit else _INF

    pr = [rank(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]  # pr[i]: rank of parts[i]+parts[i+1]
    while pr:
        m = min(pr)
        if m == _INF:
            break
        i = pr.index(m)  # leftmost lowest rank, as tiktoken
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pr[i]
        if i > 0:
            pr[i - 1] = rank(parts[i - 1] + parts[i])
        if i < len(parts) - 1:
            pr[i] = rank(parts[i] + parts[i + 1])
    return parts


class BPETokenizer(SpecialTokensMixin):
    """Byte-level BPE: a `bytes -> rank` vocabulary, a split regex, special tokens."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = "gpt4",
                 special_tokens: dict[str, int] | None = None,
                 merges: list[tuple[int, int]] | None = None):
        self.pattern = resolve_pattern(pattern)
        self._ranks = ranks
        self.special_tokens = dict(special_tokens or {})
        self._merges = merges  # derived on demand when built from ranks only (tiktoken files)
        self._setup()

    def _setup(self) -> None:
        self._decoder = {i: b for b, i in self._ranks.items()}  # id -> bytes
        clash = [s for s, i in self.special_tokens.items() if i in self._decoder]
        if clash:
            raise ConfigError(f"special token ids collide with ordinary tokens: {clash}", "special_tokens",
                              "give special tokens ids above the vocabulary")
        self._decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._vocab_size = max(self._decoder) + 1
        self._cache: dict[str, tuple[int, ...]] = {}
        self._sha: str | None = None
        self._tiktoken = None  # fast_encoder(): None = not built yet, False = not expressible

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_merges(cls, merges: Sequence[Sequence[int]], pattern: str = "gpt4",
                    special_tokens: dict[str, int] | None = None,
                    byte_order: Sequence[int] | None = None) -> "BPETokenizer":
        """Ids 0..255 are single bytes (`byte_order[i]` is id i's byte, identity by default);
        merge i = (left id, right id) creates id 256 + i whose bytes are left + right."""
        order = list(range(256)) if byte_order is None else list(byte_order)
        if sorted(order) != list(range(256)):
            raise CheckpointError("byte_order is not a permutation of 0..255", "tokenizer.json")
        vocab = [bytes([b]) for b in order]
        for n, (a, b) in enumerate(merges):
            if not (0 <= a < len(vocab) and 0 <= b < len(vocab)):
                raise CheckpointError(f"merge {n} refers to an unknown token ({a}, {b})", "tokenizer.json")
            vocab.append(vocab[a] + vocab[b])
        ranks = {tok: i for i, tok in enumerate(vocab)}
        if len(ranks) != len(vocab):
            raise CheckpointError("two merges make the same token", "tokenizer.json")
        tok = cls(ranks, pattern, special_tokens, merges=[tuple(m) for m in merges])
        tok._byte_order = order
        return tok

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int, pattern: str = "gpt4",
              special_tokens: Sequence[str] = (ENDOFTEXT,), progress: bool | None = None,
              num_proc: int | None = None) -> "BPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `texts` (a str or a stream).

        Stops early (a smaller vocabulary) when no adjacent pair is left to merge. Special tokens
        take the ids right after the last merge, in the order given. The chunks of a long stream
        are counted in `num_proc` processes (default: every core), batch by batch."""
        from gptcore.progress import progress_bar

        specials = list(dict.fromkeys(special_tokens))
        num_merges = int(vocab_size) - 256 - len(specials)
        if num_merges < 0:
            raise ConfigError(f"vocab_size {vocab_size} is below 256 bytes + {len(specials)} special tokens",
                              "tokenizer.vocab_size", f"use at least {256 + len(specials)}")
        if num_merges >= (1 << 20) - 256:
            raise ConfigError(f"vocab_size {vocab_size} is too large", "tokenizer.vocab_size", "use < 1048000")
        pat = resolve_pattern(pattern)
        with progress_bar(None, "counting chunks", unit="char", enabled=progress) as bar:
            counts = count_chunks_parallel(texts, pat, specials, num_proc, progress=bar.update)
        if not counts:
            raise DataError("no text to train the tokenizer on", "texts", "give at least one non-empty text")
        with progress_bar(num_merges, "bpe merges", unit="merge", enabled=progress) as bar:
            merges = train_merges(counts, num_merges, progress=bar.update)
        first = 256 + len(merges)
        return cls.from_merges(merges, pat, {s: first + i for i, s in enumerate(specials)})

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> "BPETokenizer":
        """OpenAI's GPT-2 `encoder.json` + `vocab.bpe` (or HF's `vocab.json` + `merges.txt`)."""
        merges, specials, order = formats.read_gpt2_files(encoder_json, vocab_bpe)
        return cls.from_merges(merges, "gpt2", specials, byte_order=order)

    @classmethod
    def from_tiktoken_file(cls, path: str | Path, pattern: str = "gpt4",
                           special_tokens: dict[str, int] | Sequence[str] = (ENDOFTEXT,)) -> "BPETokenizer":
        """A `.tiktoken` rank file (lines "base64(token) rank"). Specials given as texts get the ids
        after the last rank; give a dict for fixed ids (cl100k's "<|endoftext|>" is 100257)."""
        ranks = formats.read_tiktoken_ranks(path)
        if not isinstance(special_tokens, dict):
            top = max(ranks.values()) + 1
            special_tokens = {s: top + i for i, s in enumerate(dict.fromkeys(special_tokens))}
        return cls(ranks, pattern, special_tokens)

    # ---- encoding -----------------------------------------------------------------------------
    @functools.cached_property
    def _split(self):
        """The split regex, compiled on first use (the tiktoken fast path never needs `regex`)."""
        import regex

        return regex.compile(self.pattern)

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        b = chunk.encode("utf-8")
        r = self._ranks.get(b)
        if r is not None:
            return (r,)
        return tuple(self._ranks[p] for p in bpe(self._ranks, b))

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, special-token texts encoded as ordinary text. Chunk results are cached."""
        chunks = self._split.findall(text)
        cache = self._cache
        missing = set(chunks).difference(cache)
        if missing:
            try:
                new = {c: self._encode_chunk(c) for c in missing}
            except UnicodeEncodeError:
                return self.encode_ordinary(_fix_surrogates(text))
            if len(cache) + len(new) > _CACHE_LIMIT:  # start a fresh cache (threads holding the old one are unaffected)
                self._cache = cache = new
            else:
                cache.update(new)
        out: list[int] = []
        for ids in map(cache.__getitem__, chunks):
            out += ids
        return out

    def encode_batch(self, texts: Iterable[str], num_threads: int | None = None,
                     allowed_special="none_raise") -> list[list[int]]:
        """Encode many texts, across `num_threads` worker processes when the batch is large."""
        from gptcore.tokenizer.parallel import encode_batch

        return encode_batch(self, list(texts), num_threads, allowed_special)

    # ---- decoding -----------------------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next((i for i in ids if i not in self._decoder), None)
            raise ValueError(f"unknown token id {bad!r} (vocab_size {self.vocab_size})") from None

    def token_bytes(self, i: int) -> bytes:
        return self._decoder[i]

    # ---- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (as tiktoken's n_vocab)."""
        return self._vocab_size

    @property
    def merges(self) -> list[tuple[int, int]]:
        """Merge i = (left id, right id) makes id 256 + i; recovered with `bpe` for rank-only files."""
        if self._merges is None:
            self._merges = self._recover_merges()
        return self._merges

    def _recover_merges(self) -> list[tuple[int, int]]:
        ranks = self._ranks
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)) or any(len(self._decoder[i]) != 1 for i in range(256)):
            raise CheckpointError("ranks are not 256 bytes followed by merges", "vocabulary",
                                  "this vocabulary cannot be saved as merges")
        merges = []
        for i in range(256, n):
            left, right = bpe(ranks, self._decoder[i], max_rank=i)
            merges.append((ranks[left], ranks[right]))
        return merges

    @property
    def byte_order(self) -> list[int]:
        order = getattr(self, "_byte_order", None)
        if order is None:
            order = self._byte_order = [self._decoder[i][0] for i in range(256)]
        return order

    # ---- save / load --------------------------------------------------------------------------
    def _content(self) -> dict:
        return {
            "format": FORMAT_BPE,
            "version": VERSION,
            "pattern": self.pattern,
            "byte_order": self.byte_order,
            "merges": self.merges,  # (left, right) tuples: JSON arrays, as lists would be
            "special_tokens": self.special_tokens,
        }

    @property
    def sha256(self) -> str:
        """Content hash (canonical JSON of the saved content), also stored in tokenizer.json."""
        if self._sha is None:
            self._sha = _content_sha(self._content())
        return self._sha

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` atomically; returns its path."""
        sha, data = _dump_with_sha(self._content(), "merges")  # the 50k merges JSON-encoded once, not twice
        if self._sha is None:
            self._sha = sha
        path = Path(directory) / "tokenizer.json"
        atomic_write_bytes(path, data)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "BPETokenizer":
        path, content = _read_tokenizer_json(directory, FORMAT_BPE)
        try:
            tok = cls.from_merges(content["merges"], content["pattern"],
                                  {str(k): int(v) for k, v in content["special_tokens"].items()},
                                  byte_order=content["byte_order"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, GptcoreError):
                raise CheckpointError(exc.what, str(path), "retrain or re-save the tokenizer") from None
            raise CheckpointError(f"malformed tokenizer file ({exc!r})", str(path),
                                  "retrain or re-save the tokenizer") from None
        return tok

    # ---- tiktoken -----------------------------------------------------------------------------
    def to_tiktoken(self, name: str | None = None):
        """A `tiktoken.Encoding` with our ranks, pattern and specials: the same ids, faster."""
        try:
            import tiktoken
        except ImportError:
            raise GptcoreError("tiktoken is not installed", "to_tiktoken", "pip install tiktoken") from None
        return tiktoken.Encoding(name or f"gptcore-{self.sha256[:12]}", pat_str=self.pattern,
                                 mergeable_ranks=self._ranks, special_tokens=dict(self.special_tokens))  # read, never changed

    def fast_encoder(self):
        """`to_tiktoken()` where it is known to give our ids, else None (then use `encode_ordinary`).

        Known: tiktoken is installed and the split is one of `PATTERNS` (tiktoken's own regexes). A
        custom regex stays on our encoder: Rust's regex engine may read it differently from `regex`.
        Built once per tokenizer (~0.05 s for 50k ranks) and shared by threads: tiktoken releases the
        GIL while it encodes.
        """
        if self._tiktoken is None:
            self._tiktoken = False
            if self.pattern in PATTERNS.values():
                with contextlib.suppress(GptcoreError, ValueError):  # not installed / ranks it refuses
                    self._tiktoken = self.to_tiktoken()
        return self._tiktoken or None

    def save_tiktoken(self, path: str | Path) -> Path:
        """Write the `.tiktoken` rank file (special tokens are not part of that format)."""
        return formats.write_tiktoken_ranks(self._ranks, path)

    # ---- pickling: cheap to send to worker processes -----------------------------------------
    def __getstate__(self):
        return {"ranks": self._ranks, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "merges": self._merges, "sha": self._sha}

    def __setstate__(self, state):
        self._ranks, self.pattern = state["ranks"], state["pattern"]
        self.special_tokens, self._merges = state["special_tokens"], state["merges"]
        self._setup()
        self._sha = state["sha"]

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, specials={list(self.special_tokens)})"


