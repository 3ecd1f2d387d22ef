"""Fine-tuning a pretrained GPT for one's own task: instruction tuning or classification, LoRA or full.

The recipe, top to bottom (as `finetune()` reads):

    model, tok = load_model(base)                 a folder from pretrain, or `gptcore convert from-hf`
    data       = load_sft(finetune.dataset)       records → train/val/test (gptcore/sft_data.py)
    instruct:  loss on the response tokens only (prompt and padding are -100)
    classify:  head = Linear(C, classes) on the hidden state of each text's last token
    lora:      apply_lora(model, rank, alpha)     only A, B (and the head) train; the base is frozen
    full:      every weight trains
    loop:      AdamW, warmup + cosine, grad clipping, checkpoints every ckpt_every steps
    after:     val loss before vs after, samples beside the references / accuracy vs majority class
    outputs:   out/adapter/ (LoRA only), out/final/ (merged, self-contained), metrics.jsonl,
               samples.txt/.json (instruct), eval.json, summary.json

Checkpoints hold only what trains (`trainable.safetensors`: LoRA A/B and the head, or every weight
for `full`) plus the optimizer and RNG states, so a LoRA checkpoint of GPT-2 XL is tens of MB, not
6 GB. The batches of step s are a pure function of (seed, s) (sft_data.batch_indices), so a killed
run resumed from its last checkpoint continues bit for bit, as pre-training does.

Callbacks get the pre-training events: cb("log", row), cb("eval", row), cb("checkpoint", row),
cb("end", summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcore import sft_data
from gptcore.checkpointing import latest_intact
from gptcore.errors import CheckpointError, ConfigError, DataError
from gptcore.fileio import atomic_dir, atomic_write_json, atomic_write_text, sha256_file
from gptcore.lora import DEFAULT_TARGETS, apply_lora, merge_lora, save_adapter
from gptcore.optim import build_optimizer, lr_at, set_lr
from gptcore.train import autocast_dtype, resolve_device

Callback = Callable[[str, dict], Any]

# finetune keys that do not change the trained weights: a resumed run may change them
RESUME_FREE = ("max_steps", "log_every", "eval_every", "ckpt_every", "eval_batches", "num_samples")


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


def resume_hash(config, base_sha256: str) -> str:
    """What determines the fine-tuned weights: the finetune section (minus RESUME_FREE), seed, optimizer keys, base."""
    ft = {k: v for k, v in config.finetune.model_dump(mode="json").items() if k not in RESUME_FREE}
    t = config.train
    view = {"finetune": ft, "seed": config.run.seed, "base": base_sha256,
            "train": {"dtype": t.dtype, "grad_clip": t.grad_clip, "beta1": t.beta1, "beta2": t.beta2}}
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()


def lora_param_count(gcfg, rank: int, targets=DEFAULT_TARGETS) -> int:
    """Trainable LoRA numbers: r · (in + out) per wrapped linear (A is r×in, B is out×r)."""
    C, L = gcfg.n_embd, gcfg.n_layer
    hs = C // gcfg.n_head
    kv = (gcfg.n_kv_head or gcfg.n_head) * hs
    # MLP width: 4C for GELU; SwiGLU's 8C/3 rounded up to 64, with gate and up fused in one c_fc
    hidden = 64 * math.ceil(8 * C / 3 / 64) if gcfg.mlp == "swiglu" else 4 * C
    shapes = {"attn.c_attn": (C, C + 2 * kv), "attn.c_proj": (C, C),
              "mlp.c_fc": (C, 2 * hidden if gcfg.mlp == "swiglu" else hidden), "mlp.c_proj": (hidden, C)}
    return L * sum(rank * (i + o) for t, (i, o) in shapes.items() if t in targets)


def memory_estimate(config, gcfg, device_bf16: bool = True) -> dict[str, float]:
    """Bytes one device needs to fine-tune `gcfg` with `config.finetune` (what `gptcore plan` can show).

        weights       P · 2 (bf16 frozen base) or P · 4
        trainable     16 bytes per trained number: fp32 weight + grad + AdamW m and v
                      (LoRA: r·(in+out) per target; full: every P)
        activations   checkpointing: one (B, T, C) input per block + one block recomputed (~34·BTC bytes);
                      otherwise ~34·BTC bytes per block (bf16, flash/SDPA attention: no T² term)
        logits        B·T·V · (2 bf16 + 4 fp32 copy + 4 its grad)
    """
    ft = config.finetune
    P = _gpt_params(gcfg)
    act = 2 if device_bf16 else 4
    B, T, C, L, V = ft.batch_size, min(ft.max_len or gcfg.block_size, gcfg.block_size), gcfg.n_embd, gcfg.n_layer, gcfg.vocab_size
    lora = ft.method == "lora"
    wbytes = 2 if (lora and device_bf16 and ft.base_dtype != "float32") else 4
    trained = lora_param_count(gcfg, ft.rank, ft.targets or DEFAULT_TARGETS) if lora else P
    per_block = 17 * act * B * T * C
    acts = (L * act * B * T * C + per_block) if ft.activation_checkpointing else L * per_block
    out = {"weights": P * wbytes, "trainable_state": 16 * trained, "activations": acts, "logits": B * T * V * (act + 8)}
    out["total"] = sum(out.values())
    out["trainable_params"] = trained
    out["params"] = P
    return out


def _gpt_params(gcfg) -> int:
    with torch.device("meta"):
        from gptcore.model import GPT

        return GPT(gcfg).num_params()


class Trainee(nn.Module):
    """The model being fine-tuned plus, for classification, its new head: one module for the optimizer."""

    def __init__(self, model: nn.Module, head: nn.Linear | None):
        super().__init__()
        self.model, self.head = model, head

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# losses and evaluation


def instruct_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, int]:
    x, y = sft_data.pad_batch(batch, pad_id)  # (B, L), (B, L) with -100 on prompt + padding
    x, y = x.to(device), y.to(device)
    _, loss = model(x, y)
    return loss, int((y != sft_data.IGNORE_INDEX).sum())


def classify_logits(model, head, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    h = model.hidden(x)  # (B, L, C)
    h_last = h[torch.arange(x.size(0), device=x.device), last]  # (B, C): each text's last real token
    return head(h_last.to(head.weight.dtype))  # (B, classes)


def classify_loss(model, head, batch, pad_id: int, device) -> tuple[torch.Tensor, int]:
    ids, labels = zip(*batch)
    x, last, y = sft_data.pad_classify(list(ids), list(labels), pad_id)
    logits = classify_logits(model, head, x.to(device), last.to(device))
    return F.cross_entropy(logits.float(), y.to(device)), int(y.numel())


@torch.no_grad()
def eval_loss(trainee: Trainee, examples: list, task: str, batch_size: int, max_batches: int, pad_id: int, device, amp) -> float:
    """Mean loss over (up to) the first max_batches batches of a split, weighted by counted tokens/examples."""
    was = trainee.training
    trainee.eval()
    total, count = 0.0, 0
    for i in range(0, min(len(examples), batch_size * max_batches), batch_size):
        batch = examples[i: i + batch_size]
        with amp():
            if task == "instruct":
                loss, n = instruct_loss(trainee.model, batch, pad_id, device)
            else:
                loss, n = classify_loss(trainee.model, trainee.head, batch, pad_id, device)
        total, count = total + float(loss) * n, count + n
    trainee.train(was)
    return total / max(1, count)


@torch.no_grad()
def classify_report(trainee: Trainee, examples: list, labels: list[str], train_labels: list[int], pad_id: int, device, amp,
                    batch_size: int = 32) -> dict:
    """Accuracy, the confusion table (rows: true label, columns: predicted) and the majority-class baseline."""
    trainee.eval()
    K = len(labels)
    confusion = [[0] * K for _ in range(K)]
    for i in range(0, len(examples), batch_size):
        ids, ys = zip(*examples[i: i + batch_size])
        x, last, y = sft_data.pad_classify(list(ids), list(ys), pad_id)
        with amp():
            pred = classify_logits(trainee.model, trainee.head, x.to(device), last.to(device)).argmax(-1).cpu()
        for t, p in zip(y.tolist(), pred.tolist()):
            confusion[t][p] += 1
    n = max(1, len(examples))
    majority = max(range(K), key=lambda k: (train_labels.count(k), -k))  # the most frequent training label
    return {
        "accuracy": sum(confusion[k][k] for k in range(K)) / n,
        "majority_label": labels[majority],
        "majority_baseline": sum(1 for _, y in examples if y == majority) / n,
        "confusion": confusion,
        "labels": labels,
        "examples": len(examples),
    }


def format_confusion(report: dict) -> str:
    """A plain-text confusion table: rows are true labels, columns predicted (label ids as column heads)."""
    labels, conf = report["labels"], report["confusion"]
    w = max(len(x) for x in labels)
    lines = [" " * (w + 2) + " ".join(f"{j:>5d}" for j in range(len(labels)))]  # header: predicted ids
    for i, row in enumerate(conf):
        lines.append(f"{labels[i]:>{w}} {i:>1d}" + " ".join(f"{c:>5d}" for c in row))
    lines.append(f"accuracy {report['accuracy']:.3f}  majority-class baseline ({report['majority_label']}) "
                 f"{report['majority_baseline']:.3f}  on {report['examples']} examples")
    return "\n".join(lines)


@torch.no_grad()
def instruct_samples(model, encoder: sft_data.Encoder, records: list[dict], max_new_tokens: int, device, amp,
                     temperature: float = 0.0, seed: int = 0) -> list[dict]:
    """Greedy (temperature 0) answers for held-out instructions, beside the reference answers."""
    model.eval()
    out = []
    g = torch.Generator(device=device).manual_seed(seed) if device.type != "mps" else None
    for r in records:
        ids = encoder.prompt_ids(r, room=max_new_tokens)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        with amp():
            seq = model.generate(idx, max_new_tokens, temperature=temperature, eos_id=encoder.eot, generator=g)
        new = seq[0, len(ids):].tolist()
        if encoder.eot in new:
            new = new[: new.index(encoder.eot)]
        out.append({"instruction": r["instruction"], "input": r.get("input", ""), "reference": r["output"],
                    "generated": encoder.tok.decode(new).strip()})
    return out


def format_samples(samples: list[dict], title: str) -> str:
    parts = [f"# {title}\n"]
    for i, s in enumerate(samples, 1):
        parts.append(f"=== sample {i} ===\n### Instruction:\n{s['instruction']}\n")
        if s["input"]:
            parts.append(f"### Input:\n{s['input']}\n")
        parts.append(f"### Reference:\n{s['reference']}\n\n### Generated:\n{s['generated']}\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# checkpoints of the trainable weights


def _save_checkpoint(out_dir: Path, step: int, trainee: Trainee, optimizer, state: dict) -> Path:
    from safetensors.torch import save_file

    from gptcore.checkpointing import checkpoint_dir, rng_state

    path = checkpoint_dir(out_dir, step)
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainee.trainable().items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        atomic_write_json(tmp / "state.json", {**state, "step": step, "rng": rng_state(), "files": files})
    return path


def _load_checkpoint(path: Path, state: dict, trainee: Trainee, optimizer, config, base_sha256: str) -> None:
    from safetensors.torch import load_file

    from gptcore.checkpointing import set_rng_state

    if state.get("resume_hash") != resume_hash(config, base_sha256):
        raise CheckpointError("checkpoint was written by a different fine-tuning run (config or base model differ)", str(path),
                              "resume with the same config and --base (only finetune.max_steps and logging may change), "
                              "or pass a new --out folder")
    tensors = load_file(str(path / "trainable.safetensors"))
    own = trainee.trainable()
    if set(tensors) != set(own):
        raise CheckpointError("checkpoint tensors do not match the model being fine-tuned", str(path), "pass a new --out folder")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    set_rng_state(state["rng"])


# --------------------------------------------------------------------------------------------
# the recipe


def finetune(config, base_dir: str | Path, out_dir: str | Path, callbacks: Iterable[Callback] = ()) -> dict:
    """Fine-tune the model in `base_dir` on `config.finetune.dataset`; outputs under `out_dir`. Returns a summary."""
    from gptcore.checkpoint import load_model, model_sha256, save_model
    from gptcore.checkpointing import prune_checkpoints
    from gptcore.metrics import MetricsLog
    from gptcore.progress import progress_bar

    t_start = time.time()
    ft, tr = config.finetune, config.train
    callbacks = list(callbacks)
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    torch.manual_seed(config.run.seed)
    device = resolve_device(tr.device)
    if tr.dtype == "float16":
        raise ConfigError("fine-tuning runs in float32 or bfloat16 (float16 would need loss scaling)", "train.dtype",
                          "set train.dtype to bfloat16 (or auto/float32)")
    amp_dtype = autocast_dtype(tr.dtype, device)

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    def emit(event: str, row: dict) -> None:
        for cb in callbacks:
            cb(event, row)

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
    trainee = Trainee(model, head.to(device) if head is not None else None).train()
    optimizer = build_optimizer(trainee, lr=ft.lr, weight_decay=ft.weight_decay, betas=(tr.beta1, tr.beta2),
                                device_type=device.type)
    n_trainable = sum(p.numel() for p in trainee.trainable().values())
    n_total = sum(p.numel() for p in trainee.parameters())

    # -- resume or start
    resumed = latest_intact(out_dir, weights="trainable.safetensors")
    if resumed is not None:
        ckpt_path, state = resumed
        _load_checkpoint(ckpt_path, state, trainee, optimizer, config, base_sha)
        start, val_before = state["step"], state["val_loss_before"]
    else:
        start = 0
        val_before = eval_loss(trainee, val_ex, data.task, ft.batch_size, ft.eval_batches, pad_id, device, amp)
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if resumed else None)
    if not resumed:
        row = {"step": 0, "val_loss": val_before}
        log.write(row)
        emit("eval", row)

    # -- the loop
    tokens, t_log, last_loss, val_now = 0, time.time(), None, None
    train_labels = [y for _, y in train_ex] if data.task == "classify" else []
    params = list(trainee.trainable().values())
    with log, progress_bar(ft.max_steps - start, "finetune", unit="step", enabled=None if tr.progress else False) as bar:
        for step in range(start, ft.max_steps):
            set_lr(optimizer, lr_at(step, ft.max_steps, ft.lr, ft.min_lr, ft.warmup_steps))
            step_loss = 0.0
            for micro in range(ft.grad_accum):
                idx = sft_data.batch_indices(len(train_ex), ft.batch_size, step * ft.grad_accum + micro, config.run.seed)
                batch = [train_ex[i] for i in idx]
                with amp():
                    if data.task == "instruct":
                        loss, n = instruct_loss(model, batch, pad_id, device)
                    else:
                        loss, n = classify_loss(model, head, batch, pad_id, device)
                (loss / ft.grad_accum).backward()
                step_loss += float(loss.detach()) / ft.grad_accum
                tokens += sum(len(ex[0]) for ex in batch)
            if not math.isfinite(step_loss):
                raise DataError(f"loss became {step_loss} at step {step + 1}", "finetune.lr", "lower finetune.lr")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tr.grad_clip if tr.grad_clip > 0 else math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last_loss = step_loss
            bar.update(1, loss=f"{step_loss:.3f}")
            if done % ft.log_every == 0 or done == ft.max_steps:
                dt = max(1e-9, time.time() - t_log)
                row = {"step": done, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                       "tokens": tokens, "tokens_per_s": tokens / dt}
                log.write(row)
                emit("log", row)
                tokens, t_log = 0, time.time()
            is_ckpt = done % ft.ckpt_every == 0 or done == ft.max_steps
            val_now = None
            if done % ft.eval_every == 0 or done == ft.max_steps:
                val_now = eval_loss(trainee, val_ex, data.task, ft.batch_size, ft.eval_batches, pad_id, device, amp)
                row = {"step": done, "val_loss": val_now}
                log.write(row)
                emit("eval", row)
            if is_ckpt:
                state = {"val_loss_before": val_before, "val_loss": val_now, "resume_hash": resume_hash(config, base_sha),
                         "task": data.task, "method": ft.method}
                path = _save_checkpoint(out_dir, done, trainee, optimizer, state)
                prune_checkpoints(out_dir, tr.keep_last)
                emit("checkpoint", {"step": done, "path": str(path)})

    # -- evaluation after
    if val_now is None:  # the loop's last step evaluates; a run resumed at its end has not
        val_now = eval_loss(trainee, val_ex, data.task, ft.batch_size, ft.eval_batches, pad_id, device, amp)
    val_after = val_now
    summary: dict[str, Any] = {
        "task": data.task, "method": ft.method, "dataset": ft.dataset, "base_sha256": base_sha, "step": ft.max_steps,
        "resumed_from": start if resumed else None, "train_examples": len(train_ex), "val_examples": len(val_ex),
        "val_loss_before": val_before, "val_loss_after": val_after, "train_loss": last_loss,
        "trainable_params": n_trainable, "total_params": n_total,
    }
    held_out = data.test or data.val
    if data.task == "instruct":
        summary["samples"] = instruct_samples(model, enc, held_out[: ft.num_samples], config.eval.sample_tokens, device, amp,
                                              seed=config.run.seed)
        atomic_write_json(out_dir / "samples.json", summary["samples"])
        atomic_write_text(out_dir / "samples.txt", format_samples(summary["samples"], f"{ft.dataset}: held-out instructions"))
    else:
        lab = {name: i for i, name in enumerate(data.labels)}
        test_ex = [(enc.classify(r), lab[r["label"]]) for r in held_out]
        report = classify_report(trainee, test_ex, data.labels, train_labels, pad_id, device, amp)
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
        if head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp / "classifier.safetensors"))
            atomic_write_json(tmp / "classifier.json", {"labels": data.labels, "pooling": "last_token",
                                                        "sha256": sha256_file(tmp / "classifier.safetensors")})
    summary.update(adapter_dir=str(adapter_dir) if adapter_dir else None, final_dir=str(final_dir),
                   seconds=time.time() - t_start)
    atomic_write_json(out_dir / "eval.json", {k: v for k, v in summary.items() if k != "samples"})
    atomic_write_json(out_dir / "summary.json", summary)
    emit("end", summary)
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
