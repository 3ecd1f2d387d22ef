"""How text becomes training batches: documents -> token shards -> (x, y) windows.

    documents ──(tokenize, several processes)──> [eot] + ids per document
              ──(hash of the document)──────────> train or val
              ──(cut every shard_tokens)────────> train_000000.bin ... val_000000.bin + manifest.json
    shards ────(memmap, seeded random windows)─> ShardLoader.next_batch() -> x, y: (B, T) int64

The sources (python-stdlib, hf:..., files:...) live in `gptcore.data.sources`, the `.bin` format in
`gptcore.data.shards`; this module re-exports them so `gptcore.data.sharding` is the one name to import.

Split rule: a document goes to val when blake2b-64(its UTF-8 bytes) / 2^64 < val_fraction. The
decision depends on the document alone, so it is stable as the corpus grows. So that neither split
is ever empty, the last document moves to val (train) when no other document landed there.

Resume: manifest.json is rewritten (atomically) each time a shard completes, with the position
(document index, token offset) where that shard ends. A re-run with the same settings keeps every
listed shard whose sha256 still matches and restarts tokenizing right after the last one — documents
before it are only hashed (to check the corpus is the same), never tokenized again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from gptcore.cpus import physical_cores
from gptcore.errors import DataError
from gptcore.fileio import atomic_write_json, remove_stale_temps, sha256_file
from gptcore.progress import progress_bar
from gptcore.reads import Reads, view_hash
from gptcore.tokenizer.base import _fix_surrogates
from gptcore.data.shards import read_shard, read_shard_header, token_dtype, write_shard, write_shard_parts  # noqa: F401  (re-exported)
from gptcore.data.sources import (  # noqa: F401  (re-exported)
    cap_bytes,
    download,
    iter_documents,
    python_stdlib_documents,
    read_jsonl_documents,
)

SPLITS = ("train", "val")
SPLIT_RULE = ("val if blake2b-64(utf-8 bytes of the document) / 2^64 < val_fraction, else train; "
              "if a split would be empty, the last document goes there")
MANIFEST_FORMAT = "gptcore-shards/1"

# what `prepare_shards` reads (gptcore/reads.py); the worker count never changes the shards
READS = Reads(keys=("data.source", "data.shard_tokens", "data.val_fraction", "data.num_proc"), cadence=("data.num_proc",))


def hash_split(data: bytes, val_fraction: float) -> tuple[bytes, str]:
    """(8-byte blake2b digest, 'val' | 'train') of a document's UTF-8 bytes: the split rule."""
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return digest, "val" if int.from_bytes(digest, "big") < val_fraction * 2.0**64 else "train"


def split_of(text: str, val_fraction: float) -> str:
    """'val' or 'train' for one document, from a hash of its bytes alone."""
    return hash_split(text.encode("utf-8"), val_fraction)[1]


# --------------------------------------------------------------------------------------------
# tokenizing: tiktoken in threads (the fast path), or our own encoder in worker processes
#
# Both paths run the same `_encode_docs` over the same batches; only `encode` differs. tiktoken
# (Rust) releases the GIL while it encodes, so plain threads share one copy of the vocabulary:
# nothing to fork, pickle or send back. Our encoder is pure Python, so it needs processes.

ENCODERS = ("auto", "tiktoken", "gptcore")  # prepare_shards(encoder=...): auto = tiktoken where it can
_WORKER: dict = {}


def _init_worker(encode, eot: int, dtype) -> None:
    # Ctrl-C is the parent's to handle (it terminates the pool); SIGTERM from terminate() just ends us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER.update(encode=encode, eot=eot, dtype=dtype)


def _encode_docs(docs: list[str], first: int, val_fraction: float, skip_before: dict, encode=None, eot=None, dtype=None) -> list:
    """Hash, split and tokenize a batch of documents numbered first, first+1, ...

    Returns per document (blake2b digest, UTF-8 bytes, split, ids) with ids = [eot, *encode(text)]
    as a uint16/uint32 array, or None for a document a resumed run already wrote (index < skip_before).
    """
    if encode is None:  # in a worker process
        encode, eot, dtype = _WORKER["encode"], _WORKER["eot"], _WORKER["dtype"]
    out = []
    for i, text in enumerate(docs, first):
        data = text.encode("utf-8")
        digest, split = hash_split(data, val_fraction)
        ids = None
        if i >= skip_before[split]:
            toks = encode(text)
            ids = np.empty(len(toks) + 1, dtype=dtype)
            ids[0], ids[1:] = eot, toks
        out.append((digest, len(data), split, ids))
    return out


def tiktoken_encode(enc):
    """text -> ids (uint32 array) through a tiktoken Encoding, exactly its `encode_ordinary`.

    `encode_to_numpy` with no special tokens allowed or disallowed encodes them as ordinary text, like
    encode_ordinary, without building a Python list; lone surrogates are replaced as tiktoken does.
    """
    def encode(text: str) -> np.ndarray:
        try:
            return enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            return enc.encode_to_numpy(_fix_surrogates(text), disallowed_special=())

    return encode


def encoder_for(tokenizer, encoder: str = "auto"):
    """(encode, name): the function `prepare_shards` tokenizes with, and which one it is.

    "auto" takes tiktoken whenever the tokenizer can be expressed as a tiktoken Encoding with the
    same ids (`BPETokenizer.fast_encoder()`); "gptcore" always takes our own `encode_ordinary`
    (the readable reference); "tiktoken" insists on the fast path.
    """
    if encoder not in ENCODERS:
        raise DataError(f"unknown encoder {encoder!r}", "encoder", f"use one of {', '.join(ENCODERS)}")
    enc = getattr(tokenizer, "fast_encoder", lambda: None)() if encoder != "gptcore" else None
    if enc is not None:
        return tiktoken_encode(enc), "tiktoken"
    if encoder == "tiktoken":
        raise DataError("this tokenizer cannot be expressed as a tiktoken Encoding (not installed, or a custom split)",
                        "encoder", "pip install tiktoken, or use encoder='gptcore'")
    return tokenizer.encode_ordinary, "gptcore"


def _batches(documents: Iterable[str], batch_bytes: int = 1 << 16, batch_docs: int = 256) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) in batches of about `batch_bytes` characters."""
    batch, size, first = [], 0, 0
    for i, doc in enumerate(documents):
        batch.append(doc)
        size += len(doc)
        if size >= batch_bytes or len(batch) >= batch_docs:
            yield first, batch
            batch, size, first = [], 0, i + 1
    if batch:
        yield first, batch


@contextlib.contextmanager
def _workers(num_proc: int, encode, threads: bool, eot: int, dtype):
    """submit(docs, first, val_fraction, skip_before) -> a function that waits for that batch's result,
    run by `num_proc` threads (threads=True: a GIL-free encoder) or processes; None for one (run here).

    Processes are forked where the OS can (nothing is re-imported, the vocabulary is inherited) and
    made before any progress-bar or streaming thread starts.
    """
    if num_proc <= 1:
        yield None
    elif threads:
        with ThreadPoolExecutor(num_proc, thread_name_prefix="gptcore-shard") as ex:
            yield lambda *args: ex.submit(_encode_docs, *args, encode, eot, dtype).result
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(num_proc, initializer=_init_worker, initargs=(encode, eot, dtype)) as pool:
            yield lambda *args: pool.apply_async(_encode_docs, args).get


def _encoded(documents, submit, ahead: int, encode, eot, dtype, val_fraction, skip_before) -> Iterator[tuple]:
    """Per document, in corpus order: (digest, bytes, split, ids), tokenized by the workers (or here).

    At most `ahead` batches are in flight, so memory stays bounded however large the corpus
    (Pool.imap would read the whole input ahead).
    """
    if submit is None:
        for first, docs in _batches(documents):
            yield from _encode_docs(docs, first, val_fraction, skip_before, encode, eot, dtype)
        return
    inflight: deque = deque()
    for first, docs in _batches(documents):
        inflight.append(submit(docs, first, val_fraction, skip_before))
        if len(inflight) >= ahead:
            yield from inflight.popleft()()
    while inflight:
        yield from inflight.popleft()()


# --------------------------------------------------------------------------------------------
# writing shards


class _SplitWriter:
    """Buffers one split's tokens and cuts them into shards of exactly `shard_tokens` tokens."""

    def __init__(self, name: str, out_dir: Path, shard_tokens: int, dtype, shards: list, cursor: tuple[int, int]):
        self.name, self.out_dir, self.shard_tokens, self.dtype = name, out_dir, shard_tokens, dtype
        self.shards = shards  # manifest entries of the shards written so far (kept ones on resume)
        self.cursor = cursor  # (document index, tokens of it) of the last token already in a shard
        self.segments: deque = deque()  # (document index, offset of arr[0] in that document, arr)
        self.buffered = 0
        self.documents = self.bytes = self.tokens = 0  # this run's counts (tokens: new ones only)

    def add(self, doc: int, nbytes: int, ids) -> bool:
        """Count a document and buffer the tokens not yet in a shard; True when a shard was written."""
        self.documents += 1
        self.bytes += nbytes
        done_doc, done_tokens = self.cursor
        if ids is None or doc < done_doc:
            return False
        start = done_tokens if doc == done_doc else 0
        if start < len(ids):
            self.segments.append((doc, start, ids[start:]))
            self.buffered += len(ids) - start
            self.tokens += len(ids) - start
        wrote = False
        while self.buffered >= self.shard_tokens:
            self.write(self.shard_tokens)
            wrote = True
        return wrote

    def write(self, n: int) -> None:
        """Move the first `n` buffered tokens into the next shard file."""
        parts, need = [], n
        while need:
            doc, start, arr = self.segments[0]
            k = min(need, len(arr))
            parts.append(arr[:k])
            if k == len(arr):
                self.segments.popleft()
            else:
                self.segments[0] = (doc, start + k, arr[k:])
            need -= k
            end = (doc, start + k)
        self.buffered -= n
        path = self.out_dir / f"{self.name}_{len(self.shards):06d}.bin"
        sha = write_shard_parts(path, parts, self.dtype)  # no joined copy; hashed as written
        self.shards.append({"file": path.name, "tokens": n, "sha256": sha, "end": list(end)})
        self.cursor = end

    def finish(self) -> None:
        if self.buffered:
            self.write(self.buffered)

    def summary(self) -> dict:
        return {"documents": self.documents, "bytes": self.bytes,
                "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _verified_prefix(out_dir: Path, shards: list) -> list:
    """The leading shards that still exist with their recorded sha256 (a resumed run keeps these)."""
    kept = []
    for s in shards:
        path = out_dir / s["file"]
        try:
            read_shard_header(path)
        except DataError:
            break
        if sha256_file(path) != s["sha256"]:
            break
        kept.append(s)
    return kept


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_shards(
    documents: Iterable[str],
    tokenizer,
    out_dir: str | Path,
    shard_tokens: int = 10_000_000,
    val_fraction: float = 0.02,
    num_proc: int | None = None,
    source: str = "<documents>",
    extra: dict | None = None,
    progress: bool | None = None,
    total_bytes: int | None = None,
    encoder: str = "auto",
) -> dict:
    """Tokenize `documents` into train/val shards plus manifest.json in `out_dir`; return the manifest.

    Every document becomes [eot, *tokens]. `extra` (JSON) is stored in the manifest's settings:
    a resume only reuses shards written under identical settings. `total_bytes` (e.g. max_bytes)
    only sizes the progress bar, which shows bytes read and tokens written. `encoder` (ENCODERS):
    tiktoken in threads where it gives our ids, else our encoder in processes — the same shards.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    if tokenizer.eot_id is None:
        raise DataError("the tokenizer has no <|endoftext|> token to separate documents", "tokenizer.special_tokens",
                        "train it with '<|endoftext|>' among its special tokens")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens {shard_tokens} is not positive", "data.shard_tokens", "use e.g. 10000000")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is not between 0 and 1", "data.val_fraction", "use e.g. 0.02")
    num_proc = num_proc or physical_cores()  # one worker per physical core (gptcore/cpus.py)
    dtype = token_dtype(tokenizer.vocab_size)
    encode, used = encoder_for(tokenizer, encoder)
    eot = tokenizer.eot_id
    tok_sha = tokenizer.sha256  # read once: some tokenizers hash their content on every access
    settings = {
        "source": source, "tokenizer_sha256": tok_sha, "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id, "shard_tokens": shard_tokens, "val_fraction": val_fraction,
        "dtype": dtype.name, "split_rule": SPLIT_RULE, **(extra or {}),
    }
    manifest_path = out_dir / "manifest.json"

    # --- resume: keep the verified leading shards of an earlier run with the same settings
    old = _read_json(manifest_path)
    if not (old and old.get("format") == MANIFEST_FORMAT and old.get("settings") == settings):
        old = None
    writers = {}
    for s in SPLITS:
        shards = _verified_prefix(out_dir, old["splits"][s]["shards"]) if old else []
        cursor = tuple(shards[-1]["end"]) if shards else (-1, 0)
        writers[s] = _SplitWriter(s, out_dir, shard_tokens, dtype, shards, cursor)
    if old and old["complete"] and all(len(writers[s].shards) == len(old["splits"][s]["shards"]) for s in SPLITS):
        return old  # done before, every shard intact
    check = old["corpus"] if old else None
    skip_before = {s: writers[s].cursor[0] for s in SPLITS}
    chain = hashlib.sha256()  # over the documents' digests: is a resumed corpus the same one?
    seen = 0

    def manifest(complete: bool) -> dict:
        return {"format": MANIFEST_FORMAT, "complete": complete, "source": source,
                "tokenizer_sha256": tok_sha, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                "dtype": dtype.name, "split_rule": SPLIT_RULE, "settings": settings,
                "corpus": {"documents": seen, "digest": chain.hexdigest()},
                "splits": {s: writers[s].summary() for s in SPLITS}}

    last_text = None  # the last document's text, in case the split fallback must tokenize it here

    def texts():
        nonlocal last_text
        for last_text in documents:
            yield last_text

    def emit(i, split, nbytes, ids) -> None:
        if ids is None and i >= writers[split].cursor[0]:  # skipped by the worker, needed after all
            ids = _encode_docs([last_text], i, val_fraction, dict.fromkeys(SPLITS, 0), encode, eot, dtype)[0][3]
        if writers[split].add(i, nbytes, ids):
            atomic_write_json(manifest_path, manifest(False))

    atomic_write_json(manifest_path, manifest(False))
    pending = None  # one document of look-ahead: the last one may still have to change split
    with _workers(num_proc, encode, used == "tiktoken", eot, dtype) as submit, \
            progress_bar(total_bytes, f"sharding {source}", unit="B", enabled=progress) as bar:
        for digest, nbytes, split, ids in _encoded(texts(), submit, 2 * num_proc, encode, eot, dtype, val_fraction, skip_before):
            chain.update(digest)
            seen += 1
            if check and seen == check["documents"] and chain.hexdigest() != check["digest"]:
                raise DataError("the corpus differs from the one an interrupted prepare was sharding", str(manifest_path),
                                "delete this folder (or choose another --out) and prepare again")
            if pending is not None:
                emit(*pending)
            pending = (seen - 1, split, nbytes, ids)
            bar.update(nbytes, tokens=writers["train"].tokens + writers["val"].tokens)
    if check and seen < check["documents"]:
        raise DataError("the corpus is shorter than the one an interrupted prepare was sharding", str(manifest_path),
                        "delete this folder (or choose another --out) and prepare again")
    if seen < 2:
        raise DataError(f"the source yielded {seen} document(s); train and val need one each at least", source,
                        "point data.source at more text or raise data.max_bytes")
    i, split, nbytes, ids = pending
    other = "val" if split == "train" else "train"
    emit(i, other if writers[other].documents == 0 else split, nbytes, ids)
    for w in writers.values():
        w.finish()

    final = manifest(True)
    atomic_write_json(manifest_path, final)
    listed = {s["file"] for w in writers.values() for s in w.shards}
    for p in out_dir.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"):  # shards of an older, different run
        if p.name.split("_")[0] in SPLITS and p.name not in listed:
            p.unlink()
    return final


# --------------------------------------------------------------------------------------------
# the whole stage: tokenizer, then shards


def _tokenizer_for(config, out_dir: Path, config_sha: str):
    """The tokenizer `prepare` shards with: tokenizer.path ('gpt2' or a folder), a resumable one, or trained."""
    from gptcore import tokenizer as tok_mod

    sec, tok_dir = config.tokenizer, out_dir / "tokenizer"
    if sec.path == "gpt2":
        return tok_mod.gpt2_tokenizer()
    if sec.path:
        return tok_mod.load_tokenizer(sec.path)
    old = _read_json(out_dir / "manifest.json") or {}
    if old.get("settings", {}).get("config_sha256") == config_sha and (tok_dir / "tokenizer.json").is_file():
        try:
            tok = tok_mod.load_tokenizer(tok_dir)  # an interrupted prepare of this same config
            if tok.sha256 == old["settings"].get("tokenizer_sha256"):
                return tok
        except Exception:  # damaged: train again
            pass
    texts = cap_bytes(iter_documents(config.data), sec.train_bytes)
    return tok_mod.train_tokenizer(texts, sec)


def prepare(config, out_dir: str | Path, progress: bool | None = None) -> dict:
    """`gptcore prepare`: out_dir/tokenizer/ (trained or loaded), out_dir/*.bin and manifest.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    docs = iter_documents(config.data)  # fail fast (before training a tokenizer) on an empty source
    first = next(docs, None)
    if first is None:
        raise DataError("the source yielded no documents", config.data.source,
                        "point data.source at non-empty text (or raise data.max_bytes)")
    from gptcore import tokenizer as tok_mod
    from gptcore.data.sources import READS as DOWNLOAD_READS

    config_sha = view_hash((DOWNLOAD_READS + tok_mod.READS + READS).result_view(config))
    tokenizer = _tokenizer_for(config, out_dir, config_sha)
    tok_dir = out_dir / "tokenizer"
    try:
        from gptcore.tokenizer import load_tokenizer

        same = (tok_dir / "tokenizer.json").is_file() and load_tokenizer(tok_dir).sha256 == tokenizer.sha256
    except Exception:
        same = False
    if not same:
        tokenizer.save(tok_dir)
    d = config.data
    docs = itertools.chain([first], docs)  # the probed stream itself: the source is opened (walked) once
    return prepare_shards(docs, tokenizer, out_dir, shard_tokens=d.shard_tokens, val_fraction=d.val_fraction,
                          num_proc=d.num_proc, source=d.source, extra={"config_sha256": config_sha}, progress=progress,
                          total_bytes=d.max_bytes)


# --------------------------------------------------------------------------------------------
# reading: manifest, batches


def load_manifest(data_dir: str | Path, tokenizer=None) -> dict:
    """The complete manifest of a data folder; with `tokenizer`, check it made these shards."""
    path = Path(data_dir) / "manifest.json"
    m = _read_json(path)
    if m is None or m.get("format") != MANIFEST_FORMAT:
        raise DataError("no readable shard manifest", str(path), "run `gptcore prepare CONFIG --out DIR` first")
    if not m.get("complete"):
        raise DataError("the shards are incomplete (prepare was interrupted)", str(path), "run `gptcore prepare` again to finish them")
    if tokenizer is not None and tokenizer.sha256 != m["tokenizer_sha256"]:
        raise DataError(f"shards were made by tokenizer {m['tokenizer_sha256'][:12]}, not by the given {tokenizer.sha256[:12]}",
                        str(path), f"use the tokenizer in {Path(data_dir) / 'tokenizer'} or prepare the data again with this tokenizer")
    return m


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) of shards this process has checked


def open_shard(data_dir: str | Path, entry: dict, vocab_size: int | None = None) -> np.memmap:
    """One shard of a manifest, verified before its tokens are used: header, token count, the sha256 the
    manifest recorded (once per process and file state), and every id below `vocab_size`."""
    path = Path(data_dir) / entry["file"]
    tokens = read_shard(path)  # header and size verified
    if entry.get("tokens") is not None and len(tokens) != entry["tokens"]:
        raise DataError(f"shard holds {len(tokens)} tokens, manifest says {entry['tokens']}", str(path),
                        "run `gptcore prepare` again (or `gptcore run --refresh`)")
    st = path.stat()
    stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns, entry.get("sha256"))
    if stamp not in _VERIFIED:
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise DataError("shard does not match the sha256 in its manifest (damaged or changed)", str(path),
                            "run `gptcore prepare` again (or `gptcore run --refresh`)")
        if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
            raise DataError(f"shard holds token id {int(tokens.max())}, but the model's vocabulary has {vocab_size} ids",
                            str(path), "use the tokenizer (and model.vocab_size) the shards were made with, or prepare them again")
        _VERIFIED.add(stamp)
    return tokens


class ShardLoader:
    """Batches of (x, y) from one split: windows of block_size + 1 tokens read from memmapped shards.

    The split's shards are one token stream; window j is tokens [j·T, j·T + T + 1), so consecutive
    windows share one token (y of one = x of the next, shifted). Each epoch visits every window once
    in an order drawn from (seed, epoch); rank r of `world_size` takes windows r, r + W, r + 2W, ...
    of that order, so ranks never share a window and all get the same count. With sequential=True the
    order is 0, 1, 2, ... (a fixed validation pass). `state_dict()` is (epoch, position): a restored
    loader returns exactly the batch the original would have returned next.
    """

    def __init__(self, data_dir, split: str, batch_size: int, block_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, tokenizer=None, sequential: bool = False, vocab_size: int | None = None):
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir, tokenizer)
        if split not in self.manifest["splits"]:
            raise DataError(f"no split '{split}'", str(self.data_dir / "manifest.json"), f"use one of {', '.join(self.manifest['splits'])}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.split, self.B, self.T = split, batch_size, block_size
        self.rank, self.world_size, self.seed, self.sequential = rank, world_size, seed, sequential
        self.shards = []
        vocab = vocab_size or self.manifest.get("vocab_size")
        for entry in self.manifest["splits"][split]["shards"]:
            self.shards.append(open_shard(self.data_dir, entry, vocab))
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard k = stream[offsets[k]:offsets[k+1]]
        self.num_tokens = int(self.offsets[-1])
        self.num_windows = max(self.num_tokens - 1, 0) // block_size
        self.per_rank = self.num_windows // world_size  # windows each rank sees per epoch
        if self.per_rank == 0:
            raise DataError(f"the {split} split has {self.num_tokens} tokens: too few for {world_size} window(s) of {block_size + 1}",
                            str(self.data_dir / "manifest.json"), "lower block_size or prepare more data (data.max_bytes, data.val_fraction)")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        """Batches per epoch for this rank (the last one may wrap into the next epoch)."""
        return -(-self.per_rank // self.B)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`."""
        if self._order_epoch != epoch:
            n = self.per_rank * self.world_size
            if self.sequential:
                order = np.arange(n)
            else:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)[:n]
            self._order, self._order_epoch = order[self.rank::self.world_size], epoch
        return self._order

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] across shard boundaries."""
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - self.offsets[k]
            hi = min(stop, self.offsets[k + 1]) - self.offsets[k]
            parts.append(self.shards[k][lo:hi])
            start += hi - lo
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, windows) -> tuple:
        """(x, y) int64 tensors (len(windows), T) for the given window indices."""
        import torch

        buf = np.stack([self.tokens(j * self.T, j * self.T + self.T + 1) for j in windows]).astype(np.int64)
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    def next_batch(self) -> tuple:
        windows = []
        while len(windows) < self.B:
            if self.pos == self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
            take = min(self.B - len(windows), self.per_rank - self.pos)
            windows.extend(self.order(self.epoch)[self.pos:self.pos + take])
            self.pos += take
        return self.batch(windows)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"split": self.split, "epoch": self.epoch, "pos": self.pos, "seed": self.seed, "block_size": self.T,
                "rank": self.rank, "world_size": self.world_size, "num_windows": self.num_windows, "sequential": self.sequential}

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seed", "block_size", "world_size", "num_windows", "sequential"):
            if state.get(key) != getattr(self, {"block_size": "T"}.get(key, key)):
                raise DataError(f"loader state has {key}={state.get(key)!r}, this loader {key}={getattr(self, {'block_size': 'T'}.get(key, key))!r}",
                                str(self.data_dir), "resume with the same data folder, seed, block size and world size")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def iter_eval_batches(data_dir, batch_size: int, block_size: int, split: str = "val", max_batches: int | None = None,
                      tokenizer=None, rank: int = 0, world_size: int = 1, vocab_size: int | None = None) -> Iterator[tuple]:
    """A fixed validation pass: windows 0, 1, 2, ... of `split` (this rank's share), in batches of (x, y).

    Covers the split once (the last batch may be smaller), or stops after `max_batches`. The same
    arguments always give the same batches. It is what `gptcore.evaluation.evaluate.val_metrics`
    (pre-training's evaluations and `gptcore evaluate`) reads; `vocab_size` checks every id is below it.
    """
    loader = ShardLoader(data_dir, split, batch_size, block_size, rank, world_size, tokenizer=tokenizer, sequential=True,
                         vocab_size=vocab_size)
    order = loader.order(0)
    for b, lo in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield loader.batch(order[lo:lo + batch_size])


def bytes_per_token(data_dir, split: str = "val") -> float:
    """UTF-8 bytes per token of a split, from the manifest: bits/byte = loss_nats / ln 2 / bytes_per_token."""
    s = load_manifest(data_dir)["splits"][split]
    return s["bytes"] / s["tokens"]
