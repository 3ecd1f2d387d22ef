"""The optimizer and the learning-rate schedule, shared by pre-training and fine-tuning.

AdamW with weight decay on matrices only (embeddings and linear weights); biases and norm gains
are not decayed, as in GPT-2/nanoGPT. `train.optimizer: muon` hands the 2-D weight matrices inside
the transformer blocks to `torch.optim.Muon` (Jordan et al. 2024, the modded-nanogpt speedrun):
momentum, then the update orthogonalised by 5 Newton–Schulz steps, O ≈ U Vᵀ of the momentum's
SVD U S Vᵀ, so every direction of the matrix moves by the same amount. Embeddings, the output head
and the 1-D gains and biases stay on AdamW (Muon is for hidden matrices only). Muon's step is
rescaled by 0.2·√max(A, B) ("match_rms_adamw", Liu et al. 2025, "Muon is Scalable for LLM
Training") so both optimizers share `train.lr`, `train.weight_decay` and the schedule.

Two schedules, both starting with a linear warmup:

    lr(step) = lr · (step+1)/warmup                                   step < warmup
    cosine   = min_lr + ½ (lr − min_lr) (1 + cos(π · progress))       after, progress ∈ [0, 1]
    wsd      = lr                                                     until the last decay_fraction of steps,
             = lr − (lr − min_lr) · d                                 then linear, d ∈ [0, 1] over the decay

Warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024) holds the peak rate for most of
the run, so a run extended to more steps continues from a stable-phase checkpoint at full speed and
only the final decay depends on the length; cosine's whole curve depends on `max_steps`.
"""

from __future__ import annotations

import inspect
import math

import torch


OPTIMIZERS = ("adamw", "muon")


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices + AdamW for the rest).

    The engine sees one optimizer: `step`, `zero_grad`, `param_groups` (the schedule sets each
    group's lr). Iterating yields the parts, which is what torch.distributed.checkpoint's
    `get_optimizer_state_dict` takes, so checkpoints and resume work unchanged.
    """

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        for o in self.parts:
            o.step()


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the trainable 2-D weights inside the transformer blocks: Muon's share of the model."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and ".h." in f".{n}"]


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    device_type: str = "cpu",
    kind: str = "adamw",
) -> torch.optim.AdamW | Optimizers:
    """AdamW over the trainable parameters: 2-D+ tensors decay, 1-D tensors (bias, norms) don't.

    kind="muon": `torch.optim.Muon` for `hidden_matrices(model)`, AdamW as above for the rest.
    """
    if kind == "muon":
        names = set(hidden_matrices(model))
        named = dict(model.named_parameters())
        muon = torch.optim.Muon([named[n] for n in sorted(names)], lr=lr, weight_decay=weight_decay,
                                momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
        rest = [p for n, p in named.items() if p.requires_grad and n not in names]
        return Optimizers(muon, _adamw(rest, lr, weight_decay, betas, eps, device_type))
    return _adamw([p for p in model.parameters() if p.requires_grad], lr, weight_decay, betas, eps, device_type)


def _adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
           device_type: str) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {}
    # fused AdamW is one kernel per step instead of a loop of small ops per parameter: CUDA has it, and
    # CPU since torch 2.4 (the default on CPU is a Python loop over the parameters)
    # (plain tensors only: FSDP2's sharded DTensor parameters keep the default implementation)
    plain = not any(hasattr(p, "device_mesh") for p in params)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu") and plain:
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)


def lr_at(step: int, max_steps: int, lr: float, min_lr: float | None = None, warmup_steps: int = 0,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then cosine or wsd to `min_lr`."""
    min_lr = lr / 10 if min_lr is None else min_lr
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        start = max_steps - decay_steps
        if step < start:
            return lr
        return lr - (lr - min_lr) * min(1.0, (step - start + 1) / decay_steps)
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
