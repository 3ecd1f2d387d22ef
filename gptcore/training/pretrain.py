"""Pre-training: shards in, a model folder out — resumable to the bit (docs/03-pretraining.md).

The recipe, on the training engine (engine.py holds the loop):

    tokenizer, manifest = the data folder's                 (checks the shards came from it)
    model     = GPT(config.model), seeded by run.seed       the same init on every rank
                (DDP, or FSDP2 when it must shard; torch.compile on CUDA by default)
    batches   = ShardLoader windows of block_size + 1 tokens, rank r taking every W-th window
    loss      = next-token cross-entropy (engine.lm_loss)
    evaluate  = validation loss and bits per byte on the first eval_batches windows
    outputs   = checkpoints/step_N/ (a model folder + optimizer + state), metrics.jsonl, final/

`READS` below is the one declaration of which config keys change the result: the pipeline's cache
key and this recipe's resume check both derive from it (gptcore/reads.py). Extending
`train.max_steps` continues from the newest checkpoint, with the learning-rate schedule of the new
length (`train.schedule: wsd` keeps the peak rate until the final decay, so extending is natural).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from gptcore.cpus import torch_threads
from gptcore.errors import ConfigError, DataError
from gptcore.fileio import sha256_file
from gptcore.training import distributed as D
from gptcore.training import engine
from gptcore.training.devices import autocast_dtype, compile_by_default, flag, resolve_device  # noqa: F401 (resolve_device: re-export)
from gptcore.training.engine import train_step  # noqa: F401  (re-export: `from gptcore.training.pretrain import train_step`)

from gptcore.training import READS  # noqa: E402,F401  (declared in the package, torch-free: a cached pipeline run never imports torch)


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
    from gptcore.model.gpt import build_model

    return build_model(gcfg, device=device)


def loop_of(t, name: str = "pretrain") -> engine.Loop:
    """The engine's loop settings from a `train:`-shaped section."""
    return engine.Loop(name=name, max_steps=t.max_steps, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                       schedule=t.schedule, decay_fraction=t.decay_fraction, grad_accum=t.grad_accum,
                       grad_clip=t.grad_clip, max_bad_steps=t.max_bad_steps, log_every=t.log_every,
                       eval_every=t.eval_every, ckpt_every=t.ckpt_every, keep_last=t.keep_last, progress=t.progress)


def pretrain(config, data_dir: str | Path, out_dir: str | Path, callbacks: Sequence[engine.Callback] = ()) -> dict[str, Any]:
    """Train `config.model` on the shards in `data_dir`; write checkpoints, metrics and `out_dir/final/`.

    Run it again with the same arguments (or a larger `train.max_steps`) to continue from the newest
    intact checkpoint. Returns a summary: final_dir, step, tokens, train_loss, val_loss, val_bpb, ...
    """
    from gptcore.data.sharding import ShardLoader
    from gptcore.evaluation.evaluate import val_metrics
    from gptcore.model.folder import load_model, save_model
    from gptcore.training.checkpoints import best_checkpoint
    from gptcore.training.optim import build_optimizer
    from gptcore.training.plan import model_config, peak_flops, require_fit

    t = config.train
    t_start = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    torch.set_num_threads(t.num_threads or torch_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
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

        use_fsdp = info.enabled and flag(t.fsdp, False)
        if device.type == "cuda":  # refuse a run that cannot fit before allocating anything
            use_fsdp = require_fit(config, torch.cuda.get_device_name(device), info.world_size, vocab)

        # ---- model and optimizer (same init on every rank: same seed)
        engine.seed_everything(config.run.seed)
        raw = _build_model(gcfg, device)
        raw.gradient_checkpointing = t.activation_checkpointing
        if flag(t.compile, compile_by_default(device, t.max_steps)) and not use_fsdp:
            raw.compile()
        model = D.wrap_model(raw, info, device, fsdp=use_fsdp, mixed_bf16=amp is torch.bfloat16)
        if use_fsdp and flag(t.compile, True):
            for block in raw.transformer.h:
                block.compile()
        optimizer = build_optimizer(raw, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), device_type=device.type,
                                    kind=t.optimizer)
        loader = ShardLoader(data_dir, "train", t.batch_size, T, rank=info.rank, world_size=info.world_size,
                             seed=config.run.seed, tokenizer=tokenizer, vocab_size=vocab)  # shards verified, ids < vocab
        peak = peak_flops(device)

        def next_batch(_i: int):
            x, y = loader.next_batch()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        def evaluate() -> dict[str, float]:  # the same windows whatever the world size: the global batch
            vm = val_metrics(raw, data_dir, batch_size=t.batch_size * info.world_size, block_size=T,
                             batches=t.eval_batches, amp_dtype=amp, device=device)
            return {"val_loss": vm["val_loss"], "val_bpb": vm["val_bpb"]}

        def load_weights(path: Path) -> None:
            saved, _ = load_model(path, device="cpu")
            D.load_full_model_state_dict(model, saved.state_dict())

        recipe = engine.Recipe(
            model=model, optimizer=optimizer, next_batch=next_batch, evaluate=evaluate,
            gather_weights=lambda: D.full_model_state_dict(model),
            write_weights=lambda tmp, sd: save_model(_module_with(raw, sd, gcfg, use_fsdp), tokenizer, tmp),
            load_weights=load_weights, weights_file="model.safetensors",
            identity={"config": READS.weights_view(config), "data": sha256_file(data_dir / "manifest.json")},
            mfu=lambda tps: raw.mfu(tps, peak, T),
            rank_state=lambda: {"loader": loader.state_dict()},
            load_rank_state=lambda s: loader.load_state_dict(s["loader"]),
            amp_dtype=amp, info=info,
        )
        progress = engine.run(recipe, loop_of(t), out_dir, callbacks)

        # ---- the final model folder (the last step's weights; `best` names the best checkpoint)
        final_dir = out_dir / "final"
        model_sd = D.full_model_state_dict(model)
        if info.is_main:
            save_model(_module_with(raw, model_sd, gcfg, use_fsdp), tokenizer, final_dir)
        D.barrier(info)
        best = best_checkpoint(out_dir)
        summary = {
            "final_dir": str(final_dir), "step": progress.step, "tokens": progress.tokens,
            "train_loss": progress.train_loss, "val_loss": progress.last_eval.get("val_loss"),
            "val_bpb": progress.last_eval.get("val_bpb"), "best_val_loss": progress.best_val_loss,
            "best_checkpoint": str(best) if best else None, "bad_steps": progress.bad_steps,
            "resumed_from_step": progress.resumed_from_step, "params": raw.num_params(),
            "world_size": info.world_size, "nnodes": t.nnodes, "device": str(device),
            "dtype": str(amp or torch.float32), "seconds": time.perf_counter() - t_start,
        }
        engine.emit(callbacks, "end", summary)
        return summary
    finally:
        D.shutdown(info)


def _module_with(raw: torch.nn.Module, full_sd: dict, gcfg, sharded: bool) -> torch.nn.Module:
    """A plain GPT holding the full weights, for `save_model` (the live one when not sharded)."""
    if not sharded:
        return raw
    from gptcore.model.gpt import GPT

    with torch.device("meta"):
        m = GPT(gcfg)
    m.load_state_dict(full_sd, assign=True)
    m.tie_weights()
    return m
