"""Token shards on disk, in llm.c's `.bin` layout, so our shards and llm.c's are interchangeable.

A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens:

    header[0] = 20240520        magic
    header[1] = 1 | 2           version: 1 = tokens are uint16 (llm.c's GPT-2 shards),
                                         2 = tokens are uint32 (ours, for vocabularies above 65,536)
    header[2] = n               number of tokens
    header[3:256] = 0
    then n tokens, uint16 LE (version 1) or uint32 LE (version 2)

So a shard of n tokens is exactly 1024 + 2n (or 4n) bytes; anything else is damaged.

    write_shard("train_000000.bin", [50256, 31373, 995])   # atomic: temp file, then rename
    read_shard("train_000000.bin")                          # -> np.memmap([50256, 31373, 995], uint16)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from gptcore.errors import DataError
from gptcore.fileio import atomic_file

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSIONS = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # version -> token dtype


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65,536), else uint32."""
    return VERSIONS[1] if vocab_size <= 1 << 16 else VERSIONS[2]


def shard_header(num_tokens: int, dtype: np.dtype) -> bytes:
    """The 1024-byte header for `num_tokens` tokens stored as `dtype` (uint16 -> v1, uint32 -> v2)."""
    version = 1 if np.dtype(dtype).itemsize == 2 else 2
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, version, num_tokens
    return header.tobytes()


def _as_tokens(tokens, dtype=None) -> np.ndarray:
    arr = np.asarray(tokens)
    if dtype is None:
        if arr.dtype in (np.uint16, np.uint32):
            dtype = arr.dtype
        else:  # choose by the largest id
            dtype = VERSIONS[1] if arr.size == 0 or int(arr.max()) < 1 << 16 else VERSIONS[2]
    dtype = np.dtype(dtype).newbyteorder("<")
    if arr.size and arr.dtype.kind in "iu" and arr.dtype != dtype:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > np.iinfo(dtype).max:
            raise ValueError(f"token ids {lo}..{hi} do not fit {dtype.name}")
    return arr.astype(dtype, copy=False)


def write_shard(path: str | Path, tokens, dtype=None) -> Path:
    """Write `tokens` (ids) as one shard, atomically. dtype: uint16/uint32; default from the ids."""
    path = Path(path)
    arr = _as_tokens(tokens, dtype)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"a shard needs a non-empty 1-D token array, got shape {arr.shape} for {path}")
    write_shard_parts(path, [arr], arr.dtype)
    return path


def write_shard_parts(path: str | Path, parts, dtype) -> str:
    """Write the 1-D arrays `parts`, end to end, as one shard of `dtype` ids, atomically; return its sha256.

    Each part goes to the file (and the hash) as it is: no joined copy of the shard in memory, and the
    sha256 is taken while writing instead of reading the file back.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    parts = [np.ascontiguousarray(p, dtype=dtype) for p in parts]
    n = sum(p.size for p in parts)
    if n == 0 or any(p.ndim != 1 for p in parts):
        raise ValueError(f"a shard needs non-empty 1-D token arrays, got shapes {[p.shape for p in parts]} for {path}")
    header = shard_header(n, dtype)
    digest = hashlib.sha256(header)
    with atomic_file(path) as f:
        f.write(header)
        for p in parts:
            f.write(p.data)
            digest.update(p.data)
    return digest.hexdigest()


def _damaged(path: Path, what: str) -> DataError:
    return DataError(f"damaged token shard: {what}", str(path), "delete the data folder's shards and run `gptcore prepare` again")


def read_shard_header(path: str | Path) -> tuple[int, np.dtype]:
    """Check a shard's header and size; return (num_tokens, dtype). Raises DataError (a ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("token shard not found", str(path), "run `gptcore prepare` to make the shards")
    size = path.stat().st_size
    if size == 0:
        raise _damaged(path, "the file is empty")
    if size < HEADER_BYTES:
        raise _damaged(path, f"truncated header ({size} of {HEADER_BYTES} bytes)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise _damaged(path, f"wrong magic {magic} (expected {MAGIC}; not an llm.c/gptcore .bin shard)")
    if version not in VERSIONS:
        raise _damaged(path, f"unknown version {version} (known: {sorted(VERSIONS)})")
    dtype = VERSIONS[version]
    if n <= 0:
        raise _damaged(path, "the header says it holds no tokens")
    expected = HEADER_BYTES + n * dtype.itemsize
    if size != expected:
        raise _damaged(path, f"size {size} bytes, header promises {expected} ({n} tokens): truncated or padded")
    return n, dtype


def read_shard(path: str | Path) -> np.memmap:
    """The tokens of a shard as a read-only memmap (uint16 or uint32), header verified first."""
    n, dtype = read_shard_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))
