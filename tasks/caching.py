"""Cache keys by content, and where each stage's outputs live.

A stage's key is a hash of exactly what determines its output:

    key     = sha256(stage, Reads.result_view(config), sha256s of the upstream artifacts it reads,
                     sha256 of the gptcore code it runs)
    lineage = the same with Reads.weights_view: what a resumable stage's *training run* is

Each engine declares its `Reads` once (gptcore/reads.py); the engine's own resume check derives
from the same declaration, so the cache key and the resume check cannot disagree. Prefect adds the
task's source code (`TASK_SOURCE`); `code_digest` adds the library's, so editing gptcore/training/
recomputes pre-training. Paths never enter a key: two clones with the same config, data and code
get the same keys, and a moved file with the same bytes is still a hit.

Folders:

    <store>/artifacts/<stage>/<key>/      a finished result, written atomically (whole or absent)
    <store>/runs/<stage>/<lineage>/       where pre-training / fine-tuning train: checkpoints/,
                                          metrics.jsonl, final/ — shared by every key of a lineage,
                                          so raising max_steps continues from the newest checkpoint
                                          and a change of cadence is the same run

A cache hit is verified before it is trusted (`damaged`): every file a result recorded (`files`:
relative path -> sha256, taken when it was published) must still hold those bytes. The sha256s are
remembered in the digest book by (path, size, mtime), so an untouched 6 GB model costs a stat at
hit time; a changed file is read and compared. A damaged entry is recomputed, never trusted.

Two `gptcore run`s against the same store serialise per folder with `file_lock` (an OS lock,
released by the kernel even if the holder is killed): the second waits, then finds the first's
result in the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import gptcore
from gptcore.config import Config
from gptcore.reads import Reads

# every stage runs these: the config, errors, files, metrics, the Reads declarations
FOUNDATION = ("config.py", "errors.py", "fileio.py", "metrics.py", "progress.py", "reads.py")


@functools.lru_cache(maxsize=None)
def code_digest(packages: tuple[str, ...]) -> str:
    """sha256 over the source of `gptcore/<package>/` for each package, plus the foundation modules."""
    root = Path(gptcore.__file__).parent
    files = sorted({root / f for f in FOUNDATION} | {p for pkg in packages for p in (root / pkg).rglob("*.py")})
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _key(stage: str, view: dict, upstream: tuple[str, ...], code: tuple[str, ...]) -> str:
    payload = {"stage": stage, "config": view, "inputs": list(upstream), "code": code_digest(tuple(sorted(code)))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def stage_key(stage: str, reads: Reads, cfg: Config, upstream: tuple[str, ...] = (), code: tuple[str, ...] = ()) -> str:
    """The content key of a stage's result (24 hex)."""
    return _key(stage, reads.result_view(cfg), upstream, code)


def lineage_key(stage: str, reads: Reads, cfg: Config, upstream: tuple[str, ...] = (), code: tuple[str, ...] = ()) -> str:
    """The key of the training run a resumable stage continues: its weights view, without the keys
    that only say how far it trains, how often it reports, or what it measures."""
    return _key(stage, reads.weights_view(cfg), upstream, code)


def store_root(cfg: Config) -> Path:
    """The result store (`tracking.result_store`, default `.gptcore/`), as an absolute path."""
    return Path(cfg.tracking.result_store).expanduser().resolve()


def artifact_dir(store: str | Path, stage: str, key: str) -> Path:
    return Path(store) / "artifacts" / stage / key


def run_dir(store: str | Path, stage: str, lineage: str) -> Path:
    return Path(store) / "runs" / stage / lineage


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive OS lock on `path` (created if missing); blocks while another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock; so does the kernel if we are killed


def stage_lock(store: str | Path, stage: str, key: str):
    """The lock of one (stage, key or lineage): a second run computing the same thing waits here."""
    return file_lock(Path(store) / "locks" / f"{stage}-{key}.lock")


def content_digests(paths: list[str | Path], store: str | Path) -> list[str]:
    """sha256 of each file, remembered under the store by (path, size, mtime): a big dataset is read
    again only when its size or modification time changed. One lock and one write of the book for all."""
    from gptcore.fileio import atomic_write_json, sha256_file

    book = Path(store) / "digests.json"
    with file_lock(Path(store) / "locks" / "digests.lock"):
        try:
            known = json.loads(book.read_text())
        except (OSError, ValueError):
            known = {}
        out, changed = [], False
        for path in paths:
            path = Path(path).resolve()
            st = path.stat()
            entry = known.get(str(path))
            if not (entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns):
                entry = known[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
                changed = True
            out.append(entry["sha256"])
        if changed:
            atomic_write_json(book, known)
    return out


def input_digests(reads: Reads, cfg: Config, store: str | Path) -> tuple[str, ...]:
    """One digest per file-naming key of `reads` (over the names, sizes and contents of its files)."""
    out = []
    for key, paths in reads.input_files(cfg):
        h = hashlib.sha256(key.encode())
        for p, digest in zip(paths, content_digests(paths, store)):
            h.update(Path(p).name.encode() + b"\0" + digest.encode())
        out.append(h.hexdigest())
    return tuple(out)


def file_digests(root: str | Path, rels: list[str], store: str | Path) -> dict[str, str]:
    """{relative path: sha256} of the files `rels` under `root` (through the digest book)."""
    return dict(zip(rels, content_digests([Path(root) / r for r in rels], store)))


def folder_digests(root: str | Path, store: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`: what a published result records of itself."""
    root = Path(root)
    return file_digests(root, sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()), store)


def damaged(result: dict, store: str | Path) -> tuple[str, str] | None:
    """Why a cached result can no longer be trusted — ("missing", path) or ("corrupt", path) — or None.

    Its `path`/`dir` must exist, `path` must still hash to its `sha256`, and each of its `files`
    (relative to `dir`) to the sha256 recorded when it was published."""
    for k in ("path", "dir"):
        if isinstance(result.get(k), str) and not Path(result[k]).exists():
            return "missing", result[k]
    want = {str(Path(result.get("dir") or ".") / rel): sha for rel, sha in (result.get("files") or {}).items()}
    if isinstance(result.get("path"), str) and isinstance(result.get("sha256"), str):
        want[result["path"]] = result["sha256"]
    if not want:
        return None
    for path in want:
        if not Path(path).is_file():
            return "missing", path
    for (path, sha), got in zip(want.items(), content_digests(list(want), store)):
        if got != sha:
            return "corrupt", path
    return None
