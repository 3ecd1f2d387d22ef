"""Pre-training: shards in, a model folder out — resumable to the bit.

The loop, one optimizer step at a time (nanoGPT's recipe; the components live beside it):

    lr      = lr_at(step)                                    warmup, then cosine   (gptcore.optim)
    for each of grad_accum micro-batches:                    (B, T) tokens per rank
        loss = model(x, y) / grad_accum; loss.backward()     bf16 autocast on CUDA; DDP/FSDP
                                                             all-reduce on the last micro-batch only
    norm  = clip_grad_norm_(params, grad_clip)
    if loss or norm is NaN/inf: skip the update, count it   (stop after max_bad_steps in a row)
    else: optimizer.step()
    log every log_every, evaluate every eval_every, checkpoint every ckpt_every  (gptcore.checkpointing)

Reproducibility: everything random — init, dropout, the order of training windows — comes from
generators seeded by `run.seed` whose states are saved in each checkpoint, so a run killed at any
moment and started again with the same command ends with the same loss bit for bit (CPU, same
threads).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from gptcore import distributed as D
from gptcore.checkpointing import (
    best_checkpoint,
    check_config,
    config_hash,
    hashed_view,
    latest_intact,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gptcore.errors import ConfigError, DataError, GptcoreError
from gptcore.metrics import MetricsLog

Callback = Callable[[str, dict], None]


# ---------------------------------------------------------------------------------------------
# devices and precision


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no GPU is visible", "train.device", "use 'auto' or 'cpu'")
    return dev


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA by default, none (plain fp32) on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def _flag(value, auto: bool) -> bool:
    return auto if value == "auto" else value in (True, "on")


# ---------------------------------------------------------------------------------------------
# one optimizer step


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
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
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with D.sync_context(model, i == n - 1), amp:
            _, loss = model(x, y)  # mean over the B·T targets of this micro-batch
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
# pieces of pretrain


def load_data_side(data_dir: str | Path):
    """The tokenizer and manifest that `gptcore prepare` wrote into `data_dir`."""
    from gptcore.tokenizer import load_tokenizer

    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise DataError("no manifest.json in the data folder", str(data_dir), "run `gptcore prepare CONFIG --out DIR` first")
    if not (data_dir / "tokenizer").is_dir():
        raise DataError("no tokenizer/ in the data folder", str(data_dir), "run `gptcore prepare CONFIG --out DIR` first")
    return load_tokenizer(data_dir / "tokenizer")


def _build_model(gcfg, device: torch.device):
    """The model, initialised from torch's global generator (seeded by the caller)."""
    from gptcore.model import build_model

    return build_model(gcfg, device=device)


def _emit(callbacks: Iterable[Callback], event: str, row: dict) -> None:
    for cb in callbacks:
        cb(event, dict(row))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pretrain(config, data_dir: str | Path, out_dir: str | Path, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train `config.model` on the shards in `data_dir`; write checkpoints, metrics and `out_dir/final/`.

    Run it again with the same arguments to continue from the newest intact checkpoint.
    Returns a summary: final_dir, step, tokens, train_loss, val_loss, val_bpb, seconds, ...
    """
    from gptcore.checkpoint import load_model, save_model
    from gptcore.data import ShardLoader
    from gptcore.evaluate import val_metrics
    from gptcore.optim import build_optimizer, lr_at, set_lr
    from gptcore.plan import model_config, peak_flops, require_fit
    from gptcore.progress import progress_bar

    t = config.train
    t_start = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device_type = "cuda" if (t.device == "auto" and torch.cuda.is_available()) or t.device.startswith("cuda") else "cpu"
    info = D.init_distributed(device_type)
    try:
        device = resolve_device(t.device, info.local_rank)
        amp = autocast_dtype(t.dtype, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        tokenizer = load_data_side(data_dir)
        vocab = config.model.vocab_size or tokenizer.vocab_size
        if vocab < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size {vocab} is below the tokenizer's {tokenizer.vocab_size}",
                              "model.vocab_size", "remove it (the tokenizer's size is used) or raise it")
        gcfg = model_config(config, vocab)
        T = t.block_size or gcfg.block_size
        if T > gcfg.block_size:
            raise ConfigError(f"train.block_size {T} exceeds model.block_size {gcfg.block_size}", "train.block_size", "lower it")

        use_fsdp = info.enabled and _flag(t.fsdp, False)
        if device.type == "cuda":  # refuse a run that cannot fit before allocating anything
            use_fsdp = require_fit(config, torch.cuda.get_device_name(device), info.world_size, vocab)

        # ---- model and optimizer (same init on every rank: same seed)
        _seed_everything(config.run.seed)
        raw = _build_model(gcfg, device)
        raw.gradient_checkpointing = t.activation_checkpointing
        if _flag(t.compile, device.type == "cuda") and not use_fsdp:
            raw.compile()
        model = D.wrap_model(raw, info, device, fsdp=use_fsdp, mixed_bf16=amp is torch.bfloat16)
        if use_fsdp and _flag(t.compile, True):
            for block in raw.transformer.h:
                block.compile()
        optimizer = build_optimizer(raw, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), device_type=device.type)

        loader = ShardLoader(data_dir, "train", t.batch_size, T, rank=info.rank, world_size=info.world_size,
                             seed=config.run.seed, tokenizer=tokenizer)  # checks the shards came from this tokenizer
        tokens_per_step = t.batch_size * T * t.grad_accum * info.world_size

        # ---- resume
        step, tokens, bad_total, best_val = 0, 0, 0, None
        train_loss, val_loss, val_bpb = float("nan"), None, None
        found = latest_intact(out_dir)
        if found is not None:
            path, state = found
            check_config(state, config, path)
            if state.get("world_size", 1) != info.world_size:
                raise GptcoreError(f"checkpoint was written by {state.get('world_size')} processes, this run has {info.world_size}",
                                   str(path), "resume with the same number of processes (torchrun --nproc_per_node)")
            saved, _ = load_model(path, device="cpu")
            optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            D.load_full_state_dicts(model, optimizer, saved.state_dict(), optim_sd)
            del saved, optim_sd
            loader.load_state_dict(state["loader"][info.rank])
            set_rng_state(state["rng"][info.rank])
            step, tokens, bad_total, best_val = state["step"], state["tokens"], state.get("bad_steps", 0), state.get("best_val_loss")
            train_loss = state.get("train_loss", float("nan"))
            val_loss, val_bpb = state.get("last_val", [None, None])
        metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=step if found else None, enabled=info.is_main)

        if step >= t.max_steps and found is not None and info.is_main:
            warnings.warn(f"checkpoint {found[0].name} is already at train.max_steps={t.max_steps}; nothing to train", stacklevel=2)
        peak = peak_flops(device)
        bad_in_row = 0
        window_t, window_tokens = time.perf_counter(), 0
        show = t.progress and info.is_main
        shown: dict[str, str] = {}  # live fields beside the bar (count, rate and ETA are the bar's own)
        with metrics, progress_bar(t.max_steps, "pretrain", unit="step", enabled=None if show else False) as bar:
            bar.update(step)
            while step < t.max_steps:
                lr = lr_at(step, t.max_steps, t.lr, t.min_lr, t.warmup_steps)
                set_lr(optimizer, lr)
                batches = []
                for _ in range(t.grad_accum):
                    x, y = loader.next_batch()
                    batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
                loss, norm, ok = train_step(model, optimizer, batches, t.grad_clip, amp, info)
                step += 1
                tokens += tokens_per_step
                window_tokens += tokens_per_step
                if ok:
                    bad_in_row, train_loss = 0, loss
                else:
                    bad_in_row += 1
                    bad_total += 1
                    if info.is_main:
                        warnings.warn(f"step {step}: loss {loss} / grad norm {norm} not finite; update skipped", stacklevel=2)
                    if bad_in_row >= t.max_bad_steps:
                        raise GptcoreError(f"training diverged: {bad_in_row} steps in a row with a NaN/inf loss or gradient (step {step})",
                                           str(out_dir), "lower train.lr, raise train.warmup_steps or check the data; "
                                           "the last good checkpoint is kept and the run resumes from it")

                if step % t.log_every == 0 or step == t.max_steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    row = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens,
                           "tokens_per_s": tps, "mfu": raw.mfu(tps / info.world_size, peak, T)}
                    metrics.write(row)
                    _emit(callbacks, "log", row)
                    shown["tok/s"] = f"{tps:,.0f}"

                evaluated = False
                if step % t.eval_every == 0 or step == t.max_steps:
                    vm = val_metrics(raw, data_dir, batch_size=t.batch_size, block_size=T, batches=t.eval_batches,
                                     amp_dtype=amp, device=device)
                    val_loss, val_bpb, evaluated = vm["val_loss"], vm["val_bpb"], True
                    best_val = val_loss if best_val is None else min(best_val, val_loss)
                    row = {"step": step, "val_loss": val_loss, "val_bpb": val_bpb}
                    metrics.write(row)
                    _emit(callbacks, "eval", row)

                if step % t.ckpt_every == 0 or step == t.max_steps:
                    model_sd, optim_sd = D.full_state_dicts(model, optimizer)
                    loader_states = D.gather_objects(loader.state_dict(), info)
                    rngs = D.gather_objects(rng_state(), info)
                    if info.is_main:
                        state = {"tokens": tokens, "world_size": info.world_size, "loader": loader_states, "rng": rngs,
                                 "config_hash": config_hash(config), "config_view": hashed_view(config),
                                 "val_loss": val_loss if evaluated else None, "best_val_loss": best_val,
                                 "train_loss": train_loss, "last_val": [val_loss, val_bpb], "bad_steps": bad_total}
                        path = save_checkpoint(out_dir, step, _module_with(raw, model_sd, gcfg, use_fsdp), tokenizer, optim_sd, state)
                        prune_checkpoints(out_dir, t.keep_last)
                        _emit(callbacks, "checkpoint", {"step": step, "path": str(path)})
                    D.barrier(info)
                shown["loss"] = f"{loss:.4f}"
                bar.update(1, **shown)

        # ---- the final model folder (the last step's weights; `best` names the best checkpoint)
        final_dir = out_dir / "final"
        model_sd, _ = D.full_state_dicts(model, optimizer)
        if info.is_main:
            save_model(_module_with(raw, model_sd, gcfg, use_fsdp), tokenizer, final_dir)
        D.barrier(info)
        best = best_checkpoint(out_dir)
        summary = {
            "final_dir": str(final_dir), "step": step, "tokens": tokens, "train_loss": train_loss,
            "val_loss": val_loss, "val_bpb": val_bpb, "best_val_loss": best_val,
            "best_checkpoint": str(best) if best else None, "bad_steps": bad_total,
            "params": raw.num_params(), "world_size": info.world_size, "device": str(device),
            "seconds": time.perf_counter() - t_start,
        }
        _emit(callbacks, "end", summary)
        return summary
    finally:
        D.shutdown(info)


def _module_with(raw: torch.nn.Module, full_sd: dict, gcfg, sharded: bool) -> torch.nn.Module:
    """A plain GPT holding the full weights, for `save_model` (the live one when not sharded)."""
    if not sharded:
        return raw
    from gptcore.model import GPT

    with torch.device("meta"):
        m = GPT(gcfg)
    m.load_state_dict(full_sd, assign=True)
    m.tie_weights()
    return m
