"""Will this run fit, and how long will it take? Arithmetic before a GPU-hour is spent.

Memory per device, for P parameters trained with AdamW in fp32 master weights:

    weights 4P + gradients 4P + AdamW moments 8P   = 16 bytes/param   (÷ world size under FSDP)
    activations, per layer and micro-batch (Korthikanti et al. 2022, with fused attention):
        ≈ 34 · B·T·C bytes at 2-byte activations (bf16); ×2 in fp32
        + 5 · n_head · B·T² bytes when attention is written out (attn_impl="math")
        activation checkpointing keeps only each block's input (2·B·T·C) plus one block in flight
    logits: B·T·V · (act bytes + 4 fp32 for the loss + 4 its gradient)

Time per optimizer step = FLOPs per token (6N + attention, `GPT.flops_per_token`) × tokens per step
÷ (device peak × world size × an assumed 40% MFU). `plan()` then recommends the first setting that
fits: as configured → FSDP → activation checkpointing → a smaller micro-batch with more accumulation
(the same tokens per step). `pretrain` refuses a CUDA run that fits none of them before it starts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from gptcore.errors import ConfigError
from gptcore.model.gpt import swiglu_hidden
from gptcore.model.lora import DEFAULT_TARGETS

GiB = 1024**3
ASSUMED_MFU = 0.4

# words in the name -> (peak dense bf16 FLOP/s, memory GiB), from gpus.json beside this file
GPUS: dict[str, tuple[float, float]] = {
    name: (row[0], row[1]) for name, row in json.loads((Path(__file__).parent / "gpus.json").read_text()).items()
    if not name.startswith("_")
}


def gpu_spec(name: str) -> tuple[str, float, float]:
    """(canonical name, peak bf16 FLOP/s, memory GiB) for a GPU name such as torch reports it.

    gpu_spec("NVIDIA A100-SXM4-40GB") -> ("a100 40gb", 312e12, 40)
    """
    words = set(name.lower().replace("-", " ").replace("_", " ").split())
    hits = [k for k in GPUS if set(k.split()) <= words]
    if not hits:
        raise ConfigError(f"unknown GPU '{name}'", "--gpu", f"known: {', '.join(sorted(GPUS))}")
    key = max(hits, key=lambda k: (len(k.split()), len(k)))
    return key, *GPUS[key]


_CPU_PEAK: dict[int, float] = {}


def cpu_peak_flops() -> float:
    """Measured fp32 matmul FLOP/s of this CPU at the current thread count (the achievable peak)."""
    threads = torch.get_num_threads()
    if threads not in _CPU_PEAK:
        n = 1024
        a, b = torch.ones(n, n), torch.ones(n, n)  # no RNG use: training stays reproducible
        a @ b
        best = 0.0
        for _ in range(5):  # the fastest of five short windows: a shared machine disturbs some of them
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.06:
                a @ b
                reps += 1
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
        _CPU_PEAK[threads] = best
    return _CPU_PEAK[threads]


def peak_flops(device: torch.device | str) -> float:
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return gpu_spec(torch.cuda.get_device_name(device))[1]
        except ConfigError:
            return 312e12
    return cpu_peak_flops()


def model_config(config, vocab_size: int | None = None):
    """The GPTConfig a run builds (vocab from the argument, the config, or the tokenizer section)."""
    from gptcore.model.gpt import GPTConfig

    over = config.model.overrides()
    if vocab_size is not None:
        over["vocab_size"] = vocab_size
    elif "vocab_size" not in over:
        over["vocab_size"] = 50257 if config.tokenizer.path == "gpt2" else config.tokenizer.vocab_size
    return GPTConfig.preset(config.model.preset, **over)


def _memory(gcfg, P: int, B: int, T: int, world: int, act_bytes: int, ckpt: bool, fsdp: bool) -> dict[str, float]:
    L, C, H, V = gcfg.n_layer, gcfg.n_embd, gcfg.n_head, gcfg.vocab_size
    shard = world if fsdp else 1
    state = {"weights": 4 * P / shard, "gradients": 4 * P / shard, "optimizer": 8 * P / shard}
    per_layer = 17 * act_bytes * B * T * C  # 34·BTC bytes at 2-byte activations
    if getattr(gcfg, "attn_impl", "sdpa") == "math":
        per_layer += 2.5 * act_bytes * H * B * T * T
    if ckpt:
        acts = L * act_bytes * B * T * C + per_layer
    else:
        acts = L * per_layer
    if fsdp:
        acts += 2 * 4 * P / max(1, L)  # two gathered blocks in flight
    state["activations"] = acts
    state["logits"] = B * T * V * (act_bytes + 8)
    state["total"] = sum(state.values())
    return state


def plan(config, gpu: str | None = None, world_size: int = 1, vocab_size: int | None = None) -> dict[str, Any]:
    """Parameters, memory per device, tokens/step, step time and a recommendation for a run.

    `gpu` names a GPU ("H100", "A100-40GB", "RTX 4090", torch's device name...) or "cpu";
    by default the local CUDA device when there is one, else the CPU.
    """
    from gptcore.model.gpt import GPT

    gcfg = model_config(config, vocab_size)
    with torch.device("meta"):
        m = GPT(gcfg)
    P = m.num_params()
    fpt = float(m.flops_per_token())
    t = config.train
    T = t.block_size or gcfg.block_size
    if T > gcfg.block_size:
        raise ConfigError(f"train.block_size {T} exceeds the model's block_size {gcfg.block_size}", "train.block_size", "lower it or raise model.block_size")

    if gpu is None:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if gpu.lower() == "cpu":
        name, peak, mem_gib, act_bytes, mfu = "cpu", cpu_peak_flops(), _cpu_memory_gib(), 4, 0.5
    else:
        name, peak, mem_gib = gpu_spec(gpu)
        act_bytes, mfu = 2, ASSUMED_MFU
    usable = mem_gib * GiB * (0.9 if name != "cpu" else 0.7) - (1.0 * GiB if name != "cpu" else 0)

    fsdp_cfg = t.fsdp if isinstance(t.fsdp, bool) else {"on": True, "off": False}.get(t.fsdp)
    tokens_per_step = t.batch_size * T * t.grad_accum * world_size
    configured = dict(batch_size=t.batch_size, grad_accum=t.grad_accum, fsdp=bool(fsdp_cfg) and world_size > 1,
                      activation_checkpointing=t.activation_checkpointing)

    def mem_of(c):
        return _memory(gcfg, P, c["batch_size"], T, world_size, act_bytes, c["activation_checkpointing"], c["fsdp"])

    # same tokens per step, cheapest change first: FSDP (communication overlaps compute), then
    # activation checkpointing (+1/3 compute), then smaller micro-batches with more accumulation
    sizes = [(configured["batch_size"], configured["grad_accum"])]
    while sizes[-1][0] > 1 and sizes[-1][0] % 2 == 0:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] * 2))
    ckpts = [configured["activation_checkpointing"]] + ([True] if not configured["activation_checkpointing"] else [])
    fsdps = [configured["fsdp"]] + ([True] if world_size > 1 and fsdp_cfg is not False and not configured["fsdp"] else [])
    candidates = [dict(batch_size=b, grad_accum=a, fsdp=f, activation_checkpointing=c)
                  for b, a in sizes for c in ckpts for f in fsdps]
    recommendation = next((c for c in candidates if mem_of(c)["total"] <= usable), None)
    mem = mem_of(configured)

    step_s = fpt * tokens_per_step / (peak * world_size * mfu)
    if recommendation is not None and recommendation["activation_checkpointing"] and not configured["activation_checkpointing"]:
        step_s *= 4 / 3  # one extra forward per step
    notes = []
    if recommendation is None:
        need = mem_of({**configured, "batch_size": 1, "activation_checkpointing": True, "fsdp": world_size > 1})["total"]
        notes.append(f"does not fit {name} ({mem_gib:.0f} GiB) even at micro-batch 1 with activation checkpointing"
                     f" (needs {need / GiB:.1f} GiB); use more GPUs with FSDP or a bigger GPU")
    elif recommendation != configured:
        notes.append("the configured setting does not fit; use the recommendation (same tokens per step)")
    return {
        "model": gcfg.to_dict(),
        "params": P,
        "flops_per_token": fpt,
        "device": name,
        "device_memory_gib": mem_gib,
        "world_size": world_size,
        "tokens_per_step": tokens_per_step,
        "memory_gib": {k: v / GiB for k, v in mem.items()},
        "usable_gib": usable / GiB,
        "fits": mem["total"] <= usable,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "total_hours": step_s * t.max_steps / 3600,
        "assumed_mfu": mfu,
        "configured": configured,
        "recommendation": recommendation,
        "notes": notes,
    }


def require_fit(config, gpu: str, world_size: int = 1, vocab_size: int | None = None) -> bool:
    """Raise ConfigError unless the run fits `gpu` as configured (FSDP may be switched on when
    `train.fsdp: auto`); return whether to use FSDP. `pretrain` calls this before building anything."""
    p = plan(config, gpu=gpu, world_size=world_size, vocab_size=vocab_size)
    c, r = p["configured"], p["recommendation"]
    auto = config.train.fsdp == "auto" and world_size > 1
    if p["fits"]:
        return c["fsdp"]
    if r is not None and auto and r == {**c, "fsdp": True}:
        return True
    fix = ("; ".join(p["notes"]) if r is None else
           "use " + " ".join(f"--set train.{k}={str(v).lower()}" for k, v in r.items()) + " (see `gptcore plan CONFIG`)")
    raise ConfigError(f"this run does not fit {world_size} × {p['device']}: {p['memory_gib']['total']:.1f} GiB needed per device, "
                      f"{p['usable_gib']:.1f} GiB usable", "train", fix)


def lora_param_count(gcfg, rank: int, targets=DEFAULT_TARGETS) -> int:
    """Trainable LoRA numbers: r · (in + out) per wrapped linear (A is r×in, B is out×r)."""
    C, L = gcfg.n_embd, gcfg.n_layer
    hs = C // gcfg.n_head
    kv = (gcfg.n_kv_head or gcfg.n_head) * hs
    hidden = swiglu_hidden(C) if gcfg.mlp == "swiglu" else 4 * C  # SwiGLU fuses gate and up in one c_fc
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
        runtime       on a CPU, the process itself (Python, torch's libraries): ~0.4 GiB, measured

    Precision as the run will have it: the base is bf16 with `finetune.base_dtype: bfloat16`, or by
    default for LoRA on a bf16 GPU; activations are bf16 on a GPU, or on a CPU with `train.dtype: bfloat16`.
    (Checked against a measured GPT-2 XL LoRA run on CPU: tests/test_scale_xl.py.)
    """
    ft = config.finetune
    P = _gpt_params(gcfg)
    act = 2 if (device_bf16 or config.train.dtype == "bfloat16") else 4
    B, T, C, L, V = ft.batch_size, min(ft.max_len or gcfg.block_size, gcfg.block_size), gcfg.n_embd, gcfg.n_layer, gcfg.vocab_size
    lora = ft.method == "lora"
    bf16_base = ft.base_dtype == "bfloat16" or (ft.base_dtype == "auto" and lora and device_bf16)
    wbytes = 2 if bf16_base else 4
    trained = lora_param_count(gcfg, ft.rank, ft.targets or DEFAULT_TARGETS) if lora else P
    per_block = 17 * act * B * T * C
    acts = (L * act * B * T * C + per_block) if ft.activation_checkpointing else L * per_block
    out = {"weights": P * wbytes, "trainable_state": 16 * trained, "activations": acts, "logits": B * T * V * (act + 8),
           "runtime": 0 if device_bf16 else 0.4 * GiB}
    out["total"] = sum(out.values())
    out["trainable_params"] = trained
    out["params"] = P
    return out


def _gpt_params(gcfg) -> int:
    with torch.device("meta"):
        from gptcore.model.gpt import GPT

        return GPT(gcfg).num_params()


def plan_finetune(config, gpu: str | None = None) -> dict[str, Any]:
    """Memory and fit for `gptcore finetune` with `config.finetune` on one device.

    Fine-tuning trains on one device: the frozen base (bf16 under LoRA with `finetune.base_dtype`),
    the trained numbers' fp32 weight + grad + AdamW moments, the activations and the logits; the
    arithmetic is `memory_estimate` above. No FSDP: a recommendation toggles activation
    checkpointing, then halves the micro-batch (more accumulation, same examples per step).
    """
    gcfg = model_config(config)
    if gpu is None:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if gpu.lower() == "cpu":
        name, mem_gib, bf16 = "cpu", _cpu_memory_gib(), False
        usable = mem_gib * GiB * 0.7
    else:
        (name, _peak, mem_gib), bf16 = gpu_spec(gpu), True
        usable = mem_gib * GiB * 0.9 - 1.0 * GiB
    ft = config.finetune
    configured = dict(batch_size=ft.batch_size, grad_accum=ft.grad_accum, activation_checkpointing=ft.activation_checkpointing)

    def mem_of(c):
        trial = config.model_copy(deep=True)
        trial.finetune = ft.model_copy(update=c)
        return memory_estimate(trial, gcfg, device_bf16=bf16)

    candidates, b, a = [], ft.batch_size, ft.grad_accum
    while True:
        for ckpt in dict.fromkeys([ft.activation_checkpointing, True]):
            candidates.append(dict(batch_size=b, grad_accum=a, activation_checkpointing=ckpt))
        if b == 1 or b % 2:
            break
        b, a = b // 2, a * 2
    recommendation = next((c for c in candidates if mem_of(c)["total"] <= usable), None)
    mem = mem_of(configured)
    notes = []
    if recommendation is None:
        notes.append(f"does not fit {name} ({mem_gib:.0f} GiB) even at micro-batch 1 with activation checkpointing; "
                     "use LoRA with a bf16 base (finetune.method=lora, finetune.base_dtype=bfloat16) or a bigger GPU")
    elif recommendation != configured:
        notes.append("the configured setting does not fit; use the recommendation (same examples per step)")
    return {
        "stage": "finetune",
        "model": gcfg.to_dict(),
        "params": mem["params"],
        "trainable_params": mem["trainable_params"],
        "method": ft.method,
        "device": name,
        "device_memory_gib": mem_gib,
        "memory_gib": {k: mem[k] / GiB for k in ("weights", "trainable_state", "activations", "logits", "runtime", "total")},
        "usable_gib": usable / GiB,
        "fits": mem["total"] <= usable,
        "configured": configured,
        "recommendation": recommendation,
        "notes": notes,
    }


def format_plan_finetune(p: dict[str, Any]) -> str:
    m, r = p["memory_gib"], p["recommendation"]
    rows = [
        ("model", f"{p['model']['n_layer']} layers × {p['model']['n_embd']} wide, vocab {p['model']['vocab_size']}"),
        ("parameters", f"{p['params'] / 1e6:,.1f} M, trained {p['trainable_params'] / 1e6:,.2f} M ({p['method']})"),
        ("device", f"1 × {p['device']} ({p['device_memory_gib']:.0f} GiB, usable {p['usable_gib']:.1f})"),
        ("memory / device", f"{m['total']:.2f} GiB = frozen weights {m['weights']:.2f} + trained state {m['trainable_state']:.2f}"
                            f" + activations {m['activations']:.2f} + logits {m['logits']:.2f}"
                            + (f" + runtime {m['runtime']:.2f}" if m.get("runtime") else "")),
        ("fits as configured", "yes" if p["fits"] else "NO"),
        ("recommendation", "none fits" if r is None else
         f"batch {r['batch_size']} × accum {r['grad_accum']}, activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{w}}  {v}" for k, v in rows] + [f"note: {n}" for n in p["notes"]])


def _cpu_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return 8.0


def format_plan(p: dict[str, Any]) -> str:
    m = p["memory_gib"]
    r = p["recommendation"]
    rows = [
        ("model", f"{p['model']['n_layer']} layers × {p['model']['n_embd']} wide, {p['model']['n_head']} heads, vocab {p['model']['vocab_size']}"),
        ("parameters", f"{p['params'] / 1e6:,.1f} M"),
        ("device", f"{p['world_size']} × {p['device']} ({p['device_memory_gib']:.0f} GiB, usable {p['usable_gib']:.1f})"),
        ("tokens / step", f"{p['tokens_per_step']:,}"),
        ("memory / device", f"{m['total']:.2f} GiB = weights {m['weights']:.2f} + grads {m['gradients']:.2f}"
                            f" + AdamW {m['optimizer']:.2f} + activations {m['activations']:.2f} + logits {m['logits']:.2f}"),
        ("fits as configured", "yes" if p["fits"] else "NO"),
        ("step time (est.)", f"{p['step_time_s']:.3f} s at {p['assumed_mfu']:.0%} MFU, {p['tokens_per_s']:,.0f} tok/s"),
        ("whole run (est.)", f"{p['total_hours']:.2f} h"),
        ("recommendation", "none fits" if r is None else
         f"batch {r['batch_size']} × accum {r['grad_accum']}, FSDP {'on' if r['fsdp'] else 'off'},"
         f" activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows] + [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)
