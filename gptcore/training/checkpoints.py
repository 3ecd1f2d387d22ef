"""Training checkpoints: written atomically, verified by checksum, resumed to the bit.

    out_dir/checkpoints/step_000200/
        config.json  model.safetensors  tokenizer/tokenizer.json     <- pre-training: a model folder
        trainable.safetensors                                         <- fine-tuning: what trains (LoRA A/B, head)
        optimizer.pt                                                  <- AdamW state, full (unsharded)
        state.json                                                    <- step, progress, per-rank loader + RNG
                                                                         states, identity, sha256 of every file

A checkpoint folder is built under a temporary name and renamed when complete (`fileio.atomic_dir`),
so after a kill it either exists whole or not at all. Resume walks the folders newest first and takes
the first whose files all match the sha256 recorded in state.json; a damaged one is skipped with a
warning. state.json records the run's identity — the config view that determines the weights (each
recipe declares it once, `gptcore.config.Reads`), the data or base model, the world size — and a
checkpoint of another run is refused rather than silently mixed in; extending `max_steps` or changing
the cadence is the same run.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gptcore.errors import CheckpointError
from gptcore.fileio import atomic_dir, atomic_write_json, remove_stale_temps, sha256_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")

# ---------------------------------------------------------------------------------------------
# RNG states as JSON


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """python, numpy, torch (CPU) and CUDA generator states, JSON-serialisable."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, keys, gauss = state["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _jsonable(obj: Any) -> Any:
    """numpy/torch scalars and arrays inside a loader state → plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


# ---------------------------------------------------------------------------------------------
# writing


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    write_weights: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write `checkpoints/step_{step:06d}/` atomically: the weights (`write_weights(tmp)`: a whole
    model folder for pre-training, the trained tensors for fine-tuning), optimizer.pt, state.json.

    `state` is stored as state.json with `step`, `files` (sha256 of every other file) added.
    """
    path = checkpoint_dir(out_dir, step)
    with atomic_dir(path) as tmp:
        write_weights(tmp)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / "state.json", {**_jsonable(state), "step": step, "files": files})
    return path


# ---------------------------------------------------------------------------------------------
# reading and verifying


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete-looking checkpoint folder, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def read_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "state.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("checkpoint has no state.json", str(f), "delete this checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError("checkpoint state.json is not valid JSON", str(f), "delete this checkpoint folder") from None


def verify_checkpoint(path: str | Path, weights: str = "model.safetensors") -> dict[str, Any]:
    """Check every file against the sha256 in state.json; return the state or raise naming the file.

    `weights` is the file a checkpoint of this kind must hold: the model for pre-training, the
    trained tensors (`trainable.safetensors`) for fine-tuning."""
    path = Path(path)
    state = read_state(path)
    files = state.get("files")
    if not isinstance(files, dict) or weights not in files:
        raise CheckpointError(f"checkpoint state.json lists no {weights}", str(path / "state.json"),
                              "delete this checkpoint folder (or use a fresh output folder)")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError("checkpoint file is missing", str(f), "delete this checkpoint folder")
        if sha256_file(f) != digest:
            raise CheckpointError("checkpoint file does not match its sha256", str(f), "the file is corrupt; delete this checkpoint folder")
    return state


def latest_intact(out_dir: str | Path, weights: str = "model.safetensors") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that passes `verify_checkpoint` (warning about each one skipped)."""
    remove_stale_temps(Path(out_dir) / "checkpoints")  # half-written folders of a killed run
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return path, verify_checkpoint(path, weights)
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc.message()}", stacklevel=2)
    return None


def check_identity(saved: dict[str, Any], now: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume a checkpoint of another run: its identity (the config view that determines
    the weights, the data or base model, the world size) must equal this run's; name what differs."""
    if saved == now:
        return
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    changed = sorted(k for k in set(flat_saved) | set(flat_now) if flat_saved.get(k) != flat_now.get(k))
    shown = ", ".join(f"{k}: {flat_saved.get(k)!r} -> {flat_now.get(k)!r}" for k in changed[:5])
    raise CheckpointError(
        f"checkpoint was written by a different run ({shown})",
        str(path),
        "resume with the same config, data and number of processes (how long it trains and how often it "
        "logs, evaluates and saves may change), or pass a new --out folder",
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` checkpoints and the one with the lowest val loss; delete the rest."""
    ckpts = list_checkpoints(out_dir)
    keep = {p for _, p in ckpts[-keep_last:]}
    best = best_checkpoint(out_dir)
    if best is not None:
        keep.add(best)
    removed = [p for _, p in ckpts if p not in keep]
    for p in removed:  # renamed first, so a kill mid-delete leaves a temp (cleaned on resume), not half a checkpoint
        doomed = p.with_name(f".{p.name}.deleted.tmp")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def best_checkpoint(out_dir: str | Path) -> Path | None:
    """The kept checkpoint with the lowest recorded val loss (None when none was evaluated)."""
    scored = []
    for _, p in list_checkpoints(out_dir):
        try:
            v = read_state(p).get("val_loss")
        except CheckpointError:
            continue
        if isinstance(v, (int, float)):
            scored.append((v, p))
    return min(scored, key=lambda vp: vp[0])[1] if scored else None
