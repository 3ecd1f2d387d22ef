"""The training engine: one optimizer step and one loop, for pre-training and fine-tuning alike.

A recipe (pretrain.py, finetuning/finetune.py) builds a model, an optimizer and its batches; the
engine trains it. The two recipes differ in their loss, their batches and which parameters train —
never in loop code. One optimizer step:

    lr    = lr_at(step)                               warmup, then cosine or warmup-stable-decay
    for each of grad_accum micro-batches:             on the last one only, DDP/FSDP all-reduce
        loss = loss_fn(model, batch) / grad_accum; loss.backward()        (bf16 autocast on CUDA)
    norm  = clip_grad_norm_(params, grad_clip)
    if loss or norm is NaN/inf: drop the gradients, skip the update       (stop after max_bad_steps
    else: optimizer.step()                                                 in a row)

and around it the cadence: log every `log_every` steps, evaluate every `eval_every`, checkpoint
every `ckpt_every` (and all three at the last step). Cadence never changes the weights: a run with
another cadence, or killed and resumed from any checkpoint, ends with the same weights bit for bit
(CPU, same threads), because every random draw comes from generators whose states the checkpoint
keeps.

Callbacks see the events as they happen: cb("log", row), cb("eval", row), cb("checkpoint", row).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from gptcore.errors import GptcoreError
from gptcore.metrics import MetricsLog
from gptcore.training import distributed as D
from gptcore.training.checkpoints import (check_identity, latest_intact, prune_checkpoints, rng_state, save_checkpoint,
                                          set_rng_state)
from gptcore.training.devices import autocast
from gptcore.training.optim import lr_at, set_lr

Callback = Callable[[str, dict], None]
Batch = Any
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of a (x, y) batch: the mean over its B·T targets."""
    x, y = batch
    return model(x, y)[1]


# ---------------------------------------------------------------------------------------------
# one optimizer step


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    loss_fn: LossFn = lm_loss,
    grad_clip: float = 1.0,
    amp_dtype: torch.dtype | None = None,
    dist_info: D.DistInfo | None = None,
) -> tuple[float, float, bool]:
    """Forward/backward over `batches` (the micro-batches of one step), clip, update.

    Returns (mean loss over micro-batches and ranks, gradient norm before clipping, updated?).
    The update is skipped (and the gradients dropped) when the loss or the norm is not finite.
    """
    info = dist_info or D.DistInfo()
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        with D.sync_context(model, i == n - 1), autocast(device, amp_dtype):
            loss = loss_fn(model, batch)  # the mean over this micro-batch's targets
        (loss / n).backward()  # gradients add up over micro-batches: the mean over all of them
        total += loss.detach().float()
    loss = D.all_reduce_mean(total / n, info)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    loss_f, norm_f = float(loss), float(norm)
    if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
        optimizer.zero_grad(set_to_none=True)
        return loss_f, norm_f, False
    optimizer.step()
    return loss_f, norm_f, True


# ---------------------------------------------------------------------------------------------
# what a recipe hands the loop


@dataclass
class Loop:
    """How long, how fast and how often: the loop's settings (one config section's worth)."""

    name: str  # "pretrain" | "finetune": the progress bar and messages
    max_steps: int
    lr: float
    min_lr: float | None = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    grad_accum: int = 1
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 2
    progress: bool = True

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.max_steps, self.lr, self.min_lr, self.warmup_steps, self.schedule, self.decay_fraction)


@dataclass
class Recipe:
    """What differs between pre-training and fine-tuning, as the loop needs it.

    `next_batch(i)` returns micro-batch i (= step · grad_accum + micro) on the device;
    `evaluate()` returns at least {"val_loss": float}; `write_weights(tmp)` writes the checkpoint's
    weight files into a checkpoint folder being built (rank 0 only; `gather_weights()` runs first
    on every rank, since under FSDP gathering the full weights is a collective).
    `rank_state()` / `load_rank_state()` carry each rank's own resumable state (a data loader's
    position); `identity` is what a checkpoint must match to be resumed (config view, data, base).
    """

    model: torch.nn.Module  # what forward/backward runs through (DDP/FSDP-wrapped or plain)
    optimizer: torch.optim.Optimizer
    next_batch: Callable[[int], Batch]
    evaluate: Callable[[], dict[str, float]]
    gather_weights: Callable[[], Any]
    write_weights: Callable[[Path, Any], None]
    load_weights: Callable[[Path], None]
    weights_file: str  # the file every checkpoint of this recipe holds (verified on resume)
    identity: dict[str, Any]
    loss_fn: LossFn = lm_loss
    batch_tokens: Callable[[Batch], int] = lambda b: int(b[0].numel())
    mfu: Callable[[float], float] | None = None  # tokens/s of one rank -> model FLOPs utilisation
    rank_state: Callable[[], dict] = dict
    load_rank_state: Callable[[dict], None] = lambda s: None
    amp_dtype: torch.dtype | None = None
    info: D.DistInfo = field(default_factory=D.DistInfo)


@dataclass
class Progress:
    """What the loop carries from step to step, and a checkpoint restores."""

    step: int = 0
    tokens: int = 0
    bad_steps: int = 0
    train_loss: float = float("nan")
    last_eval: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    before: dict[str, float] = field(default_factory=dict)  # the evaluation before the first step, when asked
    resumed_from_step: int | None = None


def seed_everything(seed: int) -> None:
    """python, numpy and torch generators from one seed (the model init, dropout, data order)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def emit(callbacks: Iterable[Callback], event: str, row: dict) -> None:
    """Send a copy of `row` to every callback as `cb(event, row)` (the recipes use it for "end")."""
    for cb in callbacks:
        cb(event, dict(row))


# ---------------------------------------------------------------------------------------------
# resume


def resume(recipe: Recipe, out_dir: Path) -> Progress:
    """Restore the newest intact checkpoint in `out_dir` (weights, optimizer, RNG, per-rank state).

    Returns a fresh `Progress` when there is none. A checkpoint of another run (different identity
    or world size) is refused with the differing keys named, never silently mixed in."""
    info = recipe.info
    found = latest_intact(out_dir, weights=recipe.weights_file)
    if found is None:
        return Progress()
    path, state = found
    check_identity(state.get("identity", {}), {**recipe.identity, "world_size": info.world_size}, path)
    recipe.load_weights(path)
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    D.load_full_optimizer_state_dict(recipe.model, recipe.optimizer, optim_sd)
    del optim_sd
    ranks = state["ranks"]
    set_rng_state(ranks[info.rank]["rng"])
    recipe.load_rank_state(ranks[info.rank])
    p = state["progress"]
    return Progress(step=state["step"], tokens=p["tokens"], bad_steps=p["bad_steps"], train_loss=p["train_loss"],
                    last_eval=p["last_eval"], best_val_loss=p["best_val_loss"], before=p["before"],
                    resumed_from_step=state["step"])


def checkpoint(recipe: Recipe, loop: Loop, progress: Progress, out_dir: Path, evaluated: bool) -> Path | None:
    """Write `checkpoints/step_N/` (collective: every rank calls it; rank 0 writes)."""
    info = recipe.info
    weights = recipe.gather_weights()
    optim_sd = D.full_optimizer_state_dict(recipe.model, recipe.optimizer)
    ranks = D.gather_objects({"rng": rng_state(), **recipe.rank_state()}, info)
    path = None
    if info.is_main:
        p = asdict(progress)
        p.pop("resumed_from_step")
        state = {"identity": {**recipe.identity, "world_size": info.world_size}, "progress": p, "ranks": ranks,
                 "val_loss": progress.last_eval.get("val_loss") if evaluated else None}
        path = save_checkpoint(out_dir, progress.step, lambda tmp: recipe.write_weights(tmp, weights), optim_sd, state)
        prune_checkpoints(out_dir, loop.keep_last)
    D.barrier(info)
    return path


# ---------------------------------------------------------------------------------------------
# the loop


def run(recipe: Recipe, loop: Loop, out_dir: str | Path, callbacks: Sequence[Callback] = (),
        before: Callable[[], dict[str, float]] | None = None) -> Progress:
    """Train from `out_dir`'s newest intact checkpoint (or from scratch) to `loop.max_steps`.

    Appends to `out_dir/metrics.jsonl` (cut back to the resumed step first) and checkpoints into
    `out_dir/checkpoints/`; returns the final `Progress` (its `last_eval` is the last step's).
    `before()`, when given, evaluates the untrained model once (fine-tuning's "before" figure): the
    step-0 eval row of a fresh run, kept in every checkpoint."""
    from gptcore.progress import progress_bar

    out_dir = Path(out_dir)
    info, device = recipe.info, next(recipe.model.parameters()).device
    pr = resume(recipe, out_dir)
    resumed = pr.resumed_from_step is not None
    if resumed and info.is_main:
        print(f"[gptcore] {loop.name}: resumed from step {pr.step} ({out_dir / 'checkpoints'})", flush=True)
        if pr.step >= loop.max_steps:
            warnings.warn(f"{loop.name}: the checkpoint is already at step {pr.step} >= max_steps={loop.max_steps}; "
                          "nothing to train", stacklevel=2)
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=pr.step if resumed else None, enabled=info.is_main)
    bad_in_row = 0
    window_t, window_tokens = time.perf_counter(), 0
    shown: dict[str, str] = {}  # live fields beside the bar (count, rate and ETA are the bar's own)
    show = loop.progress and info.is_main
    if before is not None and not resumed:
        pr.before = dict(before())
        metrics.write({"step": 0, **pr.before})
        emit(callbacks, "eval", {"step": 0, **pr.before})
    with metrics, progress_bar(loop.max_steps, loop.name, unit="step", enabled=None if show else False) as bar:
        bar.update(pr.step)
        while pr.step < loop.max_steps:
            lr = loop.lr_at(pr.step)
            set_lr(recipe.optimizer, lr)
            first = pr.step * loop.grad_accum
            batches = [recipe.next_batch(first + i) for i in range(loop.grad_accum)]
            loss, norm, ok = train_step(recipe.model, recipe.optimizer, batches, recipe.loss_fn, loop.grad_clip,
                                        recipe.amp_dtype, info)
            step_tokens = sum(recipe.batch_tokens(b) for b in batches) * info.world_size
            pr.step += 1
            pr.tokens += step_tokens
            window_tokens += step_tokens
            if ok:
                bad_in_row, pr.train_loss = 0, loss
            else:
                bad_in_row += 1
                pr.bad_steps += 1
                if info.is_main:
                    warnings.warn(f"step {pr.step}: loss {loss} / grad norm {norm} not finite; update skipped", stacklevel=2)
                if bad_in_row >= loop.max_bad_steps:
                    raise GptcoreError(f"training diverged: {bad_in_row} steps in a row with a NaN/inf loss or gradient "
                                       f"(step {pr.step})", str(out_dir),
                                       "lower the learning rate, raise the warmup or check the data; "
                                       "the last good checkpoint is kept and the run resumes from it")
            last = pr.step == loop.max_steps

            if pr.step % loop.log_every == 0 or last:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                row = {"step": pr.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": pr.tokens, "tokens_per_s": tps}
                if recipe.mfu is not None:
                    row["mfu"] = recipe.mfu(tps / info.world_size)
                metrics.write(row)
                emit(callbacks, "log", row)
                shown["tok/s"] = f"{tps:,.0f}"

            evaluated = pr.step % loop.eval_every == 0 or last
            if evaluated:
                pr.last_eval = dict(recipe.evaluate())
                v = pr.last_eval["val_loss"]
                pr.best_val_loss = v if pr.best_val_loss is None else min(pr.best_val_loss, v)
                row = {"step": pr.step, **pr.last_eval}
                metrics.write(row)
                emit(callbacks, "eval", row)

            if pr.step % loop.ckpt_every == 0 or last:
                path = checkpoint(recipe, loop, pr, out_dir, evaluated)
                if path is not None:
                    emit(callbacks, "checkpoint", {"step": pr.step, "path": str(path)})
            shown["loss"] = f"{loss:.4f}"
            bar.update(1, **shown)
    if not pr.last_eval:  # resumed at its end: the last step's evaluation is in the checkpoint's progress
        pr.last_eval = dict(recipe.evaluate())
    return pr
