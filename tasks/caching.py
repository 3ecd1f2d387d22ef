"""Cache keys by content, and where each stage's outputs live.

A stage's key is a hash of exactly what determines its output:

    key = sha256(stage, the config keys it reads, the sha256s of the upstream artifacts it reads)

and Prefect adds the task's source code (`TASK_SOURCE`), so editing a task also invalidates it.
Paths never enter a key: two clones with the same config and data share nothing but get the same
keys, and a moved file with the same bytes is still a hit.

Outputs go to content-addressed folders `<store>/artifacts/<stage>/<key>/`, written atomically
(finished folders only ever appear whole). Pre-training and fine-tuning instead write in place
into their stable folder, so a retry resumes from the newest checkpoint there.

Two `gptcore run`s against the same store serialise per key with `stage_lock` (an OS file lock,
released by the kernel even if the holder is killed): the second waits, then finds the first's
result in the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from gptcore.config import Config
from gptcore.fileio import sha256_file, sha256_tree

# stage -> (config sections it reads, keys in them that do not change its output)
STAGE_CONFIG: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "download": (("data",), ("data.shard_tokens", "data.val_fraction", "data.num_proc")),
    "train_tokenizer": (("tokenizer",), ()),
    "shard": (("data",), ("data.num_proc",)),
    "pretrain": (("run", "model", "train"), ("run.name", "run.out_dir", "train.progress")),
    "evaluate": (("eval",), ()),
    "finetune": (("run", "finetune"), ("run.name", "run.out_dir")),
}
STAGES = ("download", "train_tokenizer", "shard", "pretrain", "evaluate", "finetune", "register")


def stage_key(stage: str, cfg: Config, *upstream_sha256: str) -> str:
    """The content key of `stage`: its config sections plus the hashes of what it reads (24 hex)."""
    sections, exclude = STAGE_CONFIG[stage]
    path = cfg.tokenizer.path
    if stage == "train_tokenizer" and path and path != "gpt2":  # a saved tokenizer: key on its bytes
        upstream_sha256 = (*upstream_sha256, sha256_tree(path) if Path(path).is_dir() else sha256_file(path))
    payload = {"stage": stage, "config": cfg.section_hash(*sections, exclude=exclude), "inputs": list(upstream_sha256)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def store_root(cfg: Config) -> Path:
    """The result store (`tracking.result_store`, default `.gptcore/`), as an absolute path."""
    return Path(cfg.tracking.result_store).expanduser().resolve()


def artifact_dir(store: str | Path, stage: str, key: str) -> Path:
    return Path(store) / "artifacts" / stage / key


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
    """The lock of one (stage, key): a second run computing the same thing waits here."""
    return file_lock(Path(store) / "locks" / f"{stage}-{key}.lock")
