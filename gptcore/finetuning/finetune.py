"""Fine-tuning a pretrained GPT for one's own task: instruction tuning or classification, LoRA or full.

The recipe, top to bottom (as `finetune()` reads):

    model, tok = load_model(base)                 a folder from pretrain, or `gptcore convert from-hf`
    data       = load_sft(finetune.dataset)       records → train/val/test (gptcore/data/sft.py)
    instruct:  loss on the response tokens only (prompt and padding are -100)
    classify:  head = Linear(C, classes) on the hidden state of each text's last token
    lora:      apply_lora(model, rank, alpha)     only A, B (and the head) train; the base is frozen
    full:      every weight trains
    loop:      the training engine (gptcore/training/engine.py), as pre-training: AdamW, warmup +
               cosine or wsd, clipping, the NaN policy, checkpoints every ckpt_every steps
    after:     val loss before vs after, samples beside the references / accuracy vs majority class
    outputs:   out/adapter/ (LoRA only), out/final/ (merged, self-contained), metrics.jsonl,
               samples.txt/.json (instruct), eval.json, summary.json

Checkpoints hold only what trains (`trainable.safetensors`: LoRA A/B and the head, or every weight
for `full`) plus the optimizer and RNG states, so a LoRA checkpoint of GPT-2 XL is tens of MB, not
6 GB. The batches of step s are a pure function of (seed, s) (sft_data.batch_indices), so a killed
run resumed from its last checkpoint continues bit for bit, as pre-training does. `READS` is the one
declaration of the config keys that change the result (the cache key and the resume check).

Callbacks get the pre-training events: cb("log", row), cb("eval", row), cb("checkpoint", row),
cb("end", summary).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from gptcore.cpus import torch_threads
from gptcore.data import sft as sft_data
from gptcore.errors import CheckpointError, ConfigError, DataError
from gptcore.fileio import atomic_dir, atomic_write_json, atomic_write_text, sha256_file
from gptcore.finetuning.objectives import (Trainee, classify_report, eval_loss, format_confusion,
                                           format_samples, instruct_samples)
from gptcore.model.lora import DEFAULT_TARGETS, apply_lora, merge_lora, save_adapter
from gptcore.training import distributed as D
from gptcore.training import engine
from gptcore.training.devices import autocast, autocast_dtype, flag, resolve_device
from gptcore.training.optim import build_optimizer

from gptcore.finetuning import READS  # noqa: E402,F401  (declared in the package, torch-free: a cached pipeline run never imports torch)


# --------------------------------------------------------------------------------------------
# setup helpers


def base_dtype(name: str, method: str, device: torch.device) -> torch.dtype:
    """The frozen base's storage dtype: bf16 on CUDA for LoRA by default (half the memory), else float32."""
    if name == "auto":
        return torch.bfloat16 if method == "lora" and device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name == "bfloat16" and method == "full":
        raise ConfigError("full fine-tuning keeps float32 master weights", "finetune.base_dtype",
                          "use base_dtype auto/float32 with method full, or method lora")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def loop_of(config) -> engine.Loop:
    """The engine's loop settings: the `finetune:` section, plus clipping and the NaN policy from `train:`."""
    ft, tr = config.finetune, config.train
    return engine.Loop(name="finetune", max_steps=ft.max_steps, lr=ft.lr, min_lr=ft.min_lr, warmup_steps=ft.warmup_steps,
                       schedule=ft.schedule, decay_fraction=ft.decay_fraction, grad_accum=ft.grad_accum,
                       grad_clip=tr.grad_clip, max_bad_steps=tr.max_bad_steps, log_every=ft.log_every,
                       eval_every=ft.eval_every, ckpt_every=ft.ckpt_every, keep_last=tr.keep_last, progress=tr.progress)


def _trained_weights(trainee: Trainee) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in trainee.trainable().items()}


def _load_trained(trainee: Trainee, path: Path, sharded: nn.Module | None = None) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    own = trainee.trainable()
    if set(tensors) != set(own):
        raise CheckpointError("checkpoint tensors do not match the model being fine-tuned", str(path), "pass a new --out folder")
    if sharded is not None:  # FSDP2: every rank loads its shard of the full tensors
        D.load_full_model_state_dict(sharded, tensors, strict=False)
        return
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])


# --------------------------------------------------------------------------------------------
# the recipe


def finetune(config, base_dir: str | Path, out_dir: str | Path, callbacks: Iterable[engine.Callback] = ()) -> dict:
    """Fine-tune the model in `base_dir` on `config.finetune.dataset`; outputs under `out_dir`. Returns a summary.

    Under torchrun (gptcore.training.launch) every rank runs this: the global batch is split across
    ranks, DDP (or FSDP2 for full fine-tuning with `train.fsdp: on`) averages the gradients, and
    rank 0 evaluates, samples and writes the outputs."""
    t_start = time.time()
    tr = config.train
    callbacks = list(callbacks)
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    torch.set_num_threads(tr.num_threads or torch_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.manual_seed(config.run.seed)
    device_type = "cuda" if (tr.device == "auto" and torch.cuda.is_available()) or tr.device.startswith("cuda") else "cpu"
    info = D.init_distributed(device_type)
    try:
        return _finetune(config, base_dir, out_dir, callbacks, info, t_start)
    finally:
        D.shutdown(info)


def _finetune(config, base_dir: Path, out_dir: Path, callbacks: list, info: D.DistInfo, t_start: float) -> dict:
    from safetensors.torch import save_file

    from gptcore.model.folder import load_model, model_sha256, save_model

    ft, tr = config.finetune, config.train
    device = resolve_device(tr.device, info.local_rank)
    if tr.dtype == "float16":
        raise ConfigError("fine-tuning runs in float32 or bfloat16 (float16 would need loss scaling)", "train.dtype",
                          "set train.dtype to bfloat16 (or auto/float32)")
    amp_dtype = autocast_dtype(tr.dtype, device)

    def amp():
        return autocast(device, amp_dtype)

    # -- base model and data
    base_sha = model_sha256(base_dir)
    model, tok = load_model(base_dir, device="cpu")
    data = sft_data.load_sft(ft.dataset, ft.task, ft.max_examples)
    block = model.config.block_size
    max_len = min(ft.max_len or block, block)
    enc = sft_data.Encoder(tok, max_len)
    pad_id = enc.eot
    if data.task == "instruct":
        train_ex = sft_data.encode_instruct(data.train, enc)
        val_ex = sft_data.encode_instruct(data.val, enc)
    else:
        lab = {name: i for i, name in enumerate(data.labels)}
        train_ex = [(enc.classify(r), lab[r["label"]]) for r in data.train]
        val_ex = [(enc.classify(r), lab[r["label"]]) for r in data.val]
    if not train_ex or not val_ex:
        raise DataError(f"no {'training' if not train_ex else 'validation'} example fits in {max_len} tokens", ft.dataset,
                        "raise finetune.max_len (or model.block_size), or shorten the prompts")

    # -- what trains
    head = None
    if data.task == "classify":
        head = nn.Linear(model.config.n_embd, len(data.labels))
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    wdtype = base_dtype(ft.base_dtype, ft.method, device)
    model.to(device=device, dtype=wdtype)
    if ft.method == "lora":
        apply_lora(model, ft.rank, ft.alpha, ft.lora_dropout, ft.targets or DEFAULT_TARGETS)
    else:
        model.requires_grad_(True)
    model.gradient_checkpointing = ft.activation_checkpointing
    trainee = Trainee(model, head.to(device) if head is not None else None, data.task, pad_id).train()
    # several ranks: DDP (LoRA, or full fine-tuning that fits one device), FSDP2 for full fine-tuning with train.fsdp on
    use_fsdp = info.enabled and ft.method == "full" and flag(tr.fsdp, False)
    wrapped = D.wrap_model(trainee, info, device, fsdp=use_fsdp, mixed_bf16=amp_dtype is torch.bfloat16,
                           blocks=model.transformer.h)
    optimizer = build_optimizer(trainee, lr=ft.lr, weight_decay=ft.weight_decay, betas=(tr.beta1, tr.beta2),
                                device_type=device.type)
    n_trainable = sum(p.numel() for p in trainee.trainable().values())
    n_total = sum(p.numel() for p in trainee.parameters())

    # -- the engine: fine-tuning is pre-training with another loss, other batches, fewer trained numbers
    def next_batch(i: int) -> list:  # micro-batch i of the global batch (batch_size per rank); rank r takes every W-th
        idx = sft_data.batch_indices(len(train_ex), ft.batch_size * info.world_size, i, config.run.seed)
        return [train_ex[j] for j in idx[info.rank::info.world_size]]

    def evaluate() -> dict[str, float]:  # through the wrapper's forward: FSDP2 gathers the weights it shards
        return {"val_loss": eval_loss(wrapped, val_ex, data.task, ft.batch_size, ft.eval_batches, pad_id, device, amp)}

    def gather_weights() -> dict[str, torch.Tensor]:
        if not use_fsdp:
            return _trained_weights(trainee)
        return {k: v for k, v in D.full_model_state_dict(wrapped).items() if k in trainee.trainable()}

    recipe = engine.Recipe(
        model=wrapped, optimizer=optimizer, next_batch=next_batch, evaluate=evaluate, loss_fn=lambda m, batch: m(batch),
        batch_tokens=lambda batch: sum(len(ex[0]) for ex in batch), gather_weights=gather_weights,
        write_weights=lambda tmp, tensors: save_file(tensors, str(tmp / "trainable.safetensors")),
        load_weights=lambda path: _load_trained(trainee, path, wrapped if use_fsdp else None),
        weights_file="trainable.safetensors",
        identity={"config": READS.weights_view(config), "base": base_sha}, amp_dtype=amp_dtype, info=info,
    )
    progress = engine.run(recipe, loop_of(config), out_dir, callbacks, before=evaluate)
    val_before, val_after = progress.before["val_loss"], progress.last_eval["val_loss"]
    full_sd = D.full_model_state_dict(wrapped) if use_fsdp else None  # a collective: every rank
    if not info.is_main:  # rank 0 reports and writes the outputs
        D.barrier(info)
        return {"step": progress.step, "rank": info.rank, "world_size": info.world_size}
    if full_sd is not None:  # FSDP2: the trained weights back into a plain, unsharded copy
        model, _ = load_model(base_dir, device="cpu")
        model.load_state_dict({k.removeprefix("model."): v for k, v in full_sd.items() if k.startswith("model.")})
        model.to(device)
        trainee = Trainee(model, trainee.head, data.task, pad_id)

    # -- evaluation after
    summary: dict[str, Any] = {
        "task": data.task, "method": ft.method, "dataset": ft.dataset, "base_sha256": base_sha, "step": progress.step,
        "resumed_from": progress.resumed_from_step, "resumed_from_step": progress.resumed_from_step,
        "train_examples": len(train_ex), "val_examples": len(val_ex),
        "val_loss_before": val_before, "val_loss_after": val_after, "train_loss": progress.train_loss,
        "bad_steps": progress.bad_steps, "trainable_params": n_trainable, "total_params": n_total,
        "world_size": info.world_size, "nnodes": tr.nnodes, "device": str(device), "dtype": str(amp_dtype or torch.float32),
    }
    held_out = data.test or data.val
    if data.task == "instruct":
        summary["samples"] = instruct_samples(model, enc, held_out[: ft.num_samples], config.eval.sample_tokens, device, amp,
                                              seed=config.run.seed, repetition_penalty=config.eval.repetition_penalty,
                                              no_repeat_ngram_size=config.eval.no_repeat_ngram_size)
        atomic_write_json(out_dir / "samples.json", summary["samples"])
        atomic_write_text(out_dir / "samples.txt", format_samples(summary["samples"], f"{ft.dataset}: held-out instructions"))
    else:
        lab = {name: i for i, name in enumerate(data.labels)}
        test_ex = [(enc.classify(r), lab[r["label"]]) for r in held_out]
        report = classify_report(trainee, test_ex, data.labels, [y for _, y in train_ex], pad_id, device, amp)
        summary.update(accuracy=report["accuracy"], majority_baseline=report["majority_baseline"],
                       majority_label=report["majority_label"], confusion=report["confusion"], labels=data.labels)
        atomic_write_text(out_dir / "confusion.txt", format_confusion(report) + "\n")

    # -- outputs: the adapter (unmerged), then the merged self-contained model
    meta = {"task": data.task, "dataset": ft.dataset, "labels": data.labels, "max_len": max_len,
            "prompt_template": "alpaca" if data.task == "instruct" else None}
    extra = {f"head.{k}": v for k, v in head.state_dict().items()} if head is not None else None
    adapter_dir = None
    if ft.method == "lora":
        adapter_dir = save_adapter(model, out_dir / "adapter", base_sha, extra_tensors=extra, meta=meta)
        merge_lora(model)
    model.gradient_checkpointing = False
    final_dir = out_dir / "final"
    with atomic_dir(final_dir) as tmp:
        save_model(model, tok, tmp)
        atomic_write_json(tmp / "finetune.json", meta)  # how to prompt it: `gptcore chat`, serve and the MLflow model read it
        if head is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp / "classifier.safetensors"))
            atomic_write_json(tmp / "classifier.json", {"labels": data.labels, "pooling": "last_token",
                                                        "sha256": sha256_file(tmp / "classifier.safetensors")})
    summary.update(adapter_dir=str(adapter_dir) if adapter_dir else None, final_dir=str(final_dir),
                   seconds=time.time() - t_start)
    atomic_write_json(out_dir / "eval.json", {k: v for k, v in summary.items() if k != "samples"})
    atomic_write_json(out_dir / "summary.json", summary)
    engine.emit(callbacks, "end", summary)
    D.barrier(info)
    return summary


def format_summary(s: dict) -> str:
    """A few lines for the terminal: losses before/after, accuracy or samples, where the outputs are."""
    lines = [f"{s['task']} ({s['method']}) on {s['dataset']}: {s['step']} steps, "
             f"{s['trainable_params']:,} of {s['total_params']:,} parameters trained, {s['seconds']:.0f} s",
             f"val loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}"]
    if s["task"] == "classify":
        lines.append(f"accuracy {s['accuracy']:.3f} vs majority-class baseline {s['majority_baseline']:.3f} "
                     f"({s['majority_label']})")
    for smp in s.get("samples", [])[:2]:
        lines.append(f"  reference: {smp['reference'][:100]}\n  generated: {smp['generated'][:100]}")
    if s.get("adapter_dir"):
        lines.append(f"adapter: {s['adapter_dir']}")
    lines.append(f"model:   {s['final_dir']}")
    return "\n".join(lines)
