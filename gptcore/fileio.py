"""Atomic outputs and content hashes — the two file habits every module shares.

Everything we write goes to a temporary name beside its destination and is renamed into place
when complete, so after any failure (an exception, Ctrl-C, SIGKILL) the destination either holds
the whole result or does not exist. Hashes are sha256 of file contents: caches and checkpoints
are keyed by what a file holds, never by its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """One hash for a folder: every file's relative path and content hash, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give `path` (and, for a folder, everything under it) the modes an ordinary write would: files
    0666 & ~umask (0644), folders 0777 & ~umask (0755). mkstemp/mkdtemp create 0600/0700 and
    safetensors writes 0600, which would hide a model from another user or a container."""
    mask = _umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        exec_bits = p.stat().st_mode & 0o111 if p.is_file() else 0o111
        os.chmod(p, ((0o666 | exec_bits) if p.is_file() else 0o777) & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file open at a temporary name beside `path`; renamed to `path` when the block
    completes, deleted when it raises. For outputs written as a stream (shards, a corpus).

        with atomic_file("data/train_000000.bin") as f:
            f.write(header)
            f.write(tokens.tobytes())
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        make_readable(tmp)  # mkstemp makes 0600; our outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed.

        with atomic_dir("out/final") as tmp:
            save_stuff(tmp)          # out/final appears only once this block completes
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        make_readable(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | Path) -> None:
    """Delete `.NAME.*.tmp` leftovers of a killed process inside `folder` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def link_tree(src: str | Path, dst: str | Path) -> Path:
    """Publish a copy of folder `src` at `dst`, atomically: hard links where the filesystem allows
    (no bytes copied, even for a 6 GB model), else copies. Later rewrites of `src` (files replaced by
    rename, as every writer here does) leave `dst` untouched."""
    src, dst = Path(src), Path(dst)
    with atomic_dir(dst) as tmp:
        for f in sorted(src.rglob("*")):
            target = tmp / f.relative_to(src)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    return dst
