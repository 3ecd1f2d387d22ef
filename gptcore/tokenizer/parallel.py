"""`encode_batch` across worker processes: the tokenizer is sent once per worker, ids come back as arrays.

Pure Python BPE is bound by one core; for a large batch we fork `num_threads` workers, cut the
texts into ~4 batches per worker by characters (keeping order) and collect compact `array('I')`s.
Small batches, and calls from inside a worker, stay serial: a pool costs more than it saves there.
"""

from __future__ import annotations

import array

from gptcore.cpus import physical_cores

_WORKER: dict = {}
_PARALLEL_MIN_CHARS = 1 << 20  # below this a pool costs more than it saves


def encode_batch(tok, texts: list[str], num_threads: int | None, allowed_special) -> list[list[int]]:
    """Encode `texts` with `tok` in worker processes, serially for small batches or inside a daemonic worker."""
    import multiprocessing as mp

    n = min(num_threads or physical_cores(), len(texts))
    if num_threads is None and mp.parent_process() is not None:
        n = 1  # already inside a worker process (e.g. data sharding): do not nest pools by default
    if n <= 1 or sum(map(len, texts)) < _PARALLEL_MIN_CHARS or mp.current_process().daemon:
        return [tok.encode(t, allowed_special) for t in texts]
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    target = sum(map(len, texts)) / (4 * n) + 1
    batches, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= target:
            batches.append(cur)
            cur, size = [], 0
    if cur:
        batches.append(cur)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(tok, allowed_special)) as pool:
        out: list[list[int]] = []
        for arrays in pool.map(_encode_worker, batches):
            out += [a.tolist() for a in arrays]
    return out


def _init_worker(tok, allowed_special) -> None:
    _WORKER["tok"], _WORKER["allowed"] = tok, allowed_special


def _encode_worker(batch: list[str]) -> list[array.array]:
    tok, allowed = _WORKER["tok"], _WORKER["allowed"]
    return [array.array("I", tok.encode(t, allowed)) for t in batch]
