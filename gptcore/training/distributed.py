"""Data-parallel training on PyTorch's own engines: DDP, or FSDP2 (`fully_shard`) for big models.

Started by `torchrun --nproc_per_node N -m gptcore.cli pretrain ...`: torchrun sets RANK,
LOCAL_RANK and WORLD_SIZE and we join the process group (NCCL on GPUs, gloo on CPU). Every rank
reads its own slice of each batch; gradients are averaged across ranks by the engine:

    DDP   every rank holds the whole model; gradients all-reduced after backward.
    FSDP2 every rank holds 1/N of each parameter (a DTensor); weights all-gathered per block for
          forward/backward, gradients reduce-scattered. Needed when weights + grads + AdamW
          (16 bytes/param) do not fit one device, e.g. GPT-2 XL: 1.5B × 16 B = 25 GB.

With gradient accumulation only the last micro-batch synchronises (`sync_context`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (or one already set up)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool, mixed_bf16: bool = False,
               blocks=None) -> torch.nn.Module:
    """DDP or FSDP2 around `model` (returned unchanged when not distributed). FSDP2 shards each of
    `blocks` (default: the GPT's transformer blocks) as one unit, then the rest."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
        for block in (model.transformer.h if blocks is None else blocks):  # one all-gather per block: the unit FSDP overlaps
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_context(model: torch.nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce on every micro-batch but the last one of an optimizer step."""
    if hasattr(model, "no_sync") and not last_micro_step:
        return model.no_sync()  # DDP
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last_micro_step)  # FSDP2
    return contextlib.nullcontext()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_model_state_dict(model: torch.nn.Module) -> dict:
    """The unsharded model state dict on CPU (a collective under FSDP; a plain copy otherwise)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state dict on CPU, keyed by parameter name (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(model: torch.nn.Module, model_sd: dict, strict: bool = True) -> None:
    """Load an unsharded state dict into a (possibly DDP/FSDP-wrapped) model (`strict=False`: a subset)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """Load an unsharded optimizer state dict (as `full_optimizer_state_dict` wrote it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
