"""Where a run computes and in what precision: `train.device` and `train.dtype` made concrete.

    device  auto -> cuda when a GPU is visible, else cpu; "cuda" -> this rank's GPU (LOCAL_RANK)
    dtype   auto -> bf16 autocast on CUDA, plain fp32 on CPU; float16/bfloat16/float32 as asked
    compile auto -> torch.compile on CUDA; not on CPU, where it measured no faster (compile_by_default)
"""

from __future__ import annotations

import contextlib

import torch

from gptcore.errors import ConfigError


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


def flag(value, auto: bool) -> bool:
    """A config switch that may be 'auto': `auto` when it is, else whether it is on."""
    return auto if value == "auto" else value in (True, "on")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for `dtype`, or a no-op context when running in plain fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()



def compile_by_default(device: torch.device, max_steps: int) -> bool:
    """What `train.compile: auto` means for a run of `max_steps` on `device`: compile on CUDA only.

    On CPU, benchmarks/train.py measured the compiled step at 0.99x and 1.09x the eager one (4-layer,
    128-wide benchmark model, 1 thread; BENCHMARKS.md, issue 17): the step is ~70% matmuls that
    inductor hands to the same BLAS, so a cold compilation (41 s on 2 cores) breaks even after
    thousands of steps at best, or never. `train.compile: on` still compiles."""
    return device.type == "cuda"
