"""LoRA, written from scratch: fine-tune a big model by training two thin matrices per layer.

A linear layer computes y = x Wᵀ + b with W of shape (out, in). Full fine-tuning learns an update
ΔW of the same shape. LoRA (Hu et al. 2021) bets that the useful update has low rank and writes it
as a product of two thin matrices:

    ΔW = (alpha / r) · B A        A: (r, in)   B: (out, r)   r ≪ min(in, out)

    y  = x Wᵀ + b  +  (alpha / r) · (dropout(x) Aᵀ) Bᵀ
         ─ frozen ─    ───────── trained ──────────

A starts Kaiming-uniform and B starts at zero, so at step 0 the adapted model is exactly the base
model and training moves away from it smoothly. Only A and B get gradients: for GPT-2 XL with r=16
on the four projections per block that is ~20M trainable numbers instead of 1.5B, so the optimizer
state is tiny and the frozen base can sit in bf16. After training, `merge_lora` folds the update
into W (W ← W + (alpha/r)·B A) and the model is a plain GPT again, with no inference cost.

The parameter names `lora_A` / `lora_B` and the init follow Hugging Face peft, and
tests/test_lora.py proves the math equal to peft's on a converted GPT-2.

    apply_lora(model, rank=8, alpha=16)       # wrap attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    ...train...
    save_adapter(model, "out/adapter", base_sha256=model_sha256(base_dir))
    merge_lora(model)                         # plain nn.Linear again
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptcore.errors import CheckpointError, ConfigError
from gptcore.fileio import atomic_dir, sha256_file

# attention qkv and output, MLP in and out (nanoGPT module names, relative to each block)
DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_FORMAT = "gptcore-lora"
ADAPTER_VERSION = 1


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: y = base(x) + s · dropout(x) Aᵀ Bᵀ, s = alpha/r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}", "finetune.rank", "set finetune.rank to e.g. 8")
        if alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive, got {alpha!r}", "finetune.alpha", "set finetune.alpha to e.g. 2 × rank")
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        # adapters live in float32 even when the frozen base is bf16: they are small and they are trained
        dev = base.weight.device
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dtype))  # (out, r)
        # the same init as nn.Linear's weight (and peft's lora_A): uniform in ±1/sqrt(in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = self.dropout(x).to(self.lora_A.dtype)  # (..., in)
        update = (h @ self.lora_A.T) @ self.lora_B.T  # (..., in) → (..., r) → (..., out); never forms B A
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (out, in), in the adapters' dtype (float32, or float64 in tests)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with ΔW added to its weight (in place): W ← W + s · B A, summed at ≥ float32."""
        w = self.base.weight
        acc = torch.promote_types(w.dtype, self.lora_A.dtype)
        w.copy_((w.to(acc) + self.delta_weight().to(device=w.device, dtype=acc)).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def _matches(name: str, target: str) -> bool:
    """'transformer.h.3.attn.c_attn' matches target 'attn.c_attn' (a whole-component suffix) or itself."""
    return name == target or name.endswith("." + target)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=DEFAULT_TARGETS) -> nn.Module:
    """Freeze every parameter of `model`, then wrap each targeted `nn.Linear` in a LoRALinear (in place).

    A target is a module-name suffix ('attn.c_attn' matches every block's). Returns the model.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}", "finetune.rank", "set finetune.rank to e.g. 8")
    targets = tuple(targets or DEFAULT_TARGETS)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("model already has LoRA adapters", "apply_lora", "merge_lora(model) first, or load the base model again")
    model.requires_grad_(False)
    chosen = [(n, m) for n, m in model.named_modules() if any(_matches(n, t) for t in targets)]
    for name, module in chosen:
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"LoRA target '{name}' is a {type(module).__name__}, not nn.Linear",
                              "finetune.targets", "target linear layers such as attn.c_attn, mlp.c_fc")
    if not chosen:
        raise ConfigError(f"no module matches the LoRA targets {list(targets)}", "finetune.targets",
                          f"use names such as {', '.join(DEFAULT_TARGETS)}")
    for name, module in chosen:
        _set_submodule(model, name, LoRALinear(module, rank, alpha, dropout))
    model.lora_targets = list(targets)  # recorded in adapter.json by save_adapter
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear` back (in place)."""
    for name, module in lora_modules(model).items():
        _set_submodule(model, name, module.merged())
    model.__dict__.pop("lora_targets", None)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only: {'transformer.h.0.attn.c_attn.lora_A': (r, in), '...lora_B': (out, r), ...}."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError("adapter weights not found", str(path), "pass a folder written by `gptcore finetune` (out/adapter)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"adapter weights are unreadable ({exc})", str(path), "re-run the fine-tuning that wrote it") from None


def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapter weights (an adapter folder or its .safetensors file) into the model's LoRA layers.

    A model without LoRA layers first gets them, with the rank/alpha/targets of the folder's
    adapter.json. Every adapter tensor must find its layer with the same shape, and vice versa.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = path / "adapter.safetensors" if path.is_dir() else path
    if not lora_modules(model):
        meta = read_adapter_meta(folder)
        apply_lora(model, meta["rank"], meta["alpha"], 0.0, meta["targets"])
    tensors = _read_tensors(file)
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(own) if ".lora_" in k)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(f"adapter does not fit this model: {'missing' if missing else 'unexpected'} tensor '{first}'",
                              str(file), "load it onto the base model (and targets) it was trained on")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in own.items():
            if tensors[k].shape != t.shape:
                raise CheckpointError(f"adapter tensor '{k}' has shape {tuple(tensors[k].shape)}, the model wants {tuple(t.shape)}",
                                      str(file), "load it onto the base model it was trained on, with the same rank")
            params[k].copy_(tensors[k])
    return model


# --------------------------------------------------------------------------------------------
# adapter folders: adapter.safetensors + adapter.json


def save_adapter(model: nn.Module, out_dir: str | Path, base_sha256: str | None, extra_tensors: dict | None = None,
                 meta: dict | None = None) -> Path:
    """Write `out_dir/adapter.safetensors` + `out_dir/adapter.json` atomically; returns out_dir.

    adapter.json holds rank, alpha, targets, the base checkpoint's sha256 (so the adapter is never
    applied to a different model) and the weights file's own sha256. `extra_tensors` (e.g. a
    classification head) are stored beside the LoRA tensors under their own names.
    """
    mods = lora_modules(model)
    if not mods:
        raise ConfigError("model has no LoRA layers to save", "save_adapter", "call apply_lora(model, ...) first")
    first = next(iter(mods.values()))
    targets = list(getattr(model, "lora_targets", None) or sorted(mods))
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter.safetensors"))
        info = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "rank": first.rank,
            "alpha": first.alpha,
            "dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
            "targets": targets,
            "modules": sorted(mods),
            "base_sha256": base_sha256,
            "adapter_sha256": sha256_file(tmp / "adapter.safetensors"),
            **(meta or {}),
        }
        (tmp / "adapter.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """adapter.json, checked: format, version, and that adapter.safetensors matches its recorded sha256."""
    adapter_dir = Path(adapter_dir)
    p = adapter_dir / "adapter.json"
    if not p.is_file():
        raise CheckpointError("adapter.json not found", str(adapter_dir), "pass a folder written by `gptcore finetune` (out/adapter)")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"adapter.json is not valid JSON ({exc})", str(p), "re-run the fine-tuning that wrote it") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT or meta.get("version") != ADAPTER_VERSION:
        raise CheckpointError("not a gptcore LoRA adapter (format/version)", str(p), f"expected format {ADAPTER_FORMAT} v{ADAPTER_VERSION}")
    w = adapter_dir / "adapter.safetensors"
    if not w.is_file():
        raise CheckpointError("adapter weights not found", str(w), "the adapter folder is incomplete; re-run the fine-tuning")
    if meta.get("adapter_sha256") and sha256_file(w) != meta["adapter_sha256"]:
        raise CheckpointError("adapter weights do not match their recorded sha256 (corrupt or edited)", str(w),
                              "re-run the fine-tuning that wrote it")
    return meta


def apply_adapter(model: nn.Module, adapter_dir: str | Path, base_dir: str | Path | None = None) -> nn.Module:
    """Wrap `model` (loaded from `base_dir`) with the adapter in `adapter_dir`, unmerged (in place).

    When `base_dir` is given, its checkpoint sha256 must equal the one the adapter was trained on.
    """
    meta = read_adapter_meta(adapter_dir)
    if base_dir is not None and meta.get("base_sha256"):
        from gptcore.model.folder import model_sha256

        actual = model_sha256(base_dir)
        if actual != meta["base_sha256"]:
            raise CheckpointError(
                f"adapter was trained on base {meta['base_sha256'][:12]}…, but this checkpoint is {actual[:12]}…",
                str(adapter_dir), f"pass the base checkpoint it was trained on (--base), not {base_dir}")
    return load_lora(model, adapter_dir)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
