"""`gptcore plan`: parameter counts against transformers, memory arithmetic, fit / refuse decisions."""

from __future__ import annotations

import pytest
import torch

from gptcore.config import config_from_dict
from gptcore.errors import ConfigError
from gptcore.training.plan import GiB, gpu_spec, plan


def cfg(preset="gpt2", **train):
    return config_from_dict({"tokenizer": {"path": "gpt2"}, "model": {"preset": preset},
                             "train": {"batch_size": 16, "block_size": 1024, "max_steps": 100, **train}})


@pytest.mark.parametrize("preset,hf_kwargs", [("gpt2", {}), ("gpt2-xl", dict(n_layer=48, n_head=25, n_embd=1600))])
def test_params_match_transformers(preset, hf_kwargs):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config(**hf_kwargs))
    want = sum(p.numel() for p in hf.parameters())  # the tied matrix once
    assert plan(cfg(preset), gpu="H100")["params"] == want
    assert want in (124_439_808, 1_557_611_200)


def test_memory_arithmetic_and_fsdp_sharding():
    one = plan(cfg("gpt2"), gpu="H100")
    P = one["params"]
    m = one["memory_gib"]
    assert m["weights"] * GiB == 4 * P and m["gradients"] * GiB == 4 * P and m["optimizer"] * GiB == 8 * P
    assert one["tokens_per_step"] == 16 * 1024
    assert one["fits"] and one["recommendation"]["batch_size"] == 16
    eight = plan(cfg("gpt2", fsdp="on"), gpu="H100", world_size=8)
    assert eight["memory_gib"]["optimizer"] * GiB == pytest.approx(8 * P / 8)
    assert eight["tokens_per_step"] == 8 * 16 * 1024
    # activation checkpointing keeps one block's activations instead of all twelve
    ck = plan(cfg("gpt2", activation_checkpointing=True), gpu="H100")
    assert ck["memory_gib"]["activations"] < m["activations"] / 3
    assert ck["memory_gib"]["logits"] == m["logits"]  # the (B, T, V) logits are not checkpointed


def test_step_time_scales_with_peak_flops():
    h100, a100 = plan(cfg("gpt2"), gpu="H100"), plan(cfg("gpt2"), gpu="A100")
    assert a100["step_time_s"] / h100["step_time_s"] == pytest.approx(989 / 312)
    # 6·N·tokens dominates: 124M params (85M non-embedding) × 16k tokens at 40% of 989 TFLOP/s
    fl = 6 * 85_000_000 * 16 * 1024
    assert fl / (989e12 * 0.4) < h100["step_time_s"] < 2 * fl / (989e12 * 0.4)


def test_xl_needs_fsdp_or_refuses():
    alone = plan(cfg("gpt2-xl", batch_size=8), gpu="L4")  # 24 GiB: 1.56B × 16 B = 23 GiB of state alone
    assert not alone["fits"] and alone["recommendation"] is None
    assert "does not fit" in alone["notes"][0]
    node = plan(cfg("gpt2-xl", batch_size=8), gpu="A100-40GB", world_size=8)
    assert not node["fits"] and node["recommendation"] == {"batch_size": 8, "grad_accum": 1, "fsdp": True, "activation_checkpointing": False}
    small = plan(cfg("gpt2-xl", batch_size=8), gpu="L4", world_size=8)  # FSDP alone is not enough on 24 GiB
    r = small["recommendation"]
    assert r["fsdp"] and r["activation_checkpointing"] and r["batch_size"] * r["grad_accum"] == 8  # same tokens/step
    off = plan(cfg("gpt2-xl", batch_size=8, fsdp="off"), gpu="L4", world_size=8)
    assert off["recommendation"] is None  # the user forbade the one thing that would make it fit


def test_require_fit_refuses_before_start():
    from gptcore.training.plan import require_fit

    assert require_fit(cfg("gpt2"), "NVIDIA H100 80GB HBM3") is False  # fits as configured: DDP
    with pytest.raises(ConfigError, match="does not fit 1 × l4") as e:
        require_fit(cfg("gpt2-xl", batch_size=8), "NVIDIA L4")
    assert "more GPUs with FSDP" in e.value.fix
    assert require_fit(cfg("gpt2-xl", batch_size=8), "NVIDIA A100-SXM4-40GB", world_size=8) is True  # fsdp: auto turns it on
    with pytest.raises(ConfigError, match="does not fit") as e:  # checkpointing needed: the user must opt in
        require_fit(cfg("gpt2-xl", batch_size=8), "NVIDIA L4", world_size=8)
    assert "--set train.activation_checkpointing=true" in e.value.fix


def test_gpu_names():
    assert gpu_spec("NVIDIA H100 80GB HBM3")[0] == "h100"
    assert gpu_spec("NVIDIA A100-SXM4-40GB")[2] == 40
    assert gpu_spec("NVIDIA GeForce RTX 4090")[0] == "rtx 4090"
    assert gpu_spec("NVIDIA L4")[0] == "l4"
    with pytest.raises(ConfigError, match="unknown GPU"):
        gpu_spec("Voodoo 2")


def test_plan_cli(run_cli, tmp_path):
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    r = run_cli("plan", tiny, "--gpu", "H100")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "recommendation" in r.stdout
    r = run_cli("plan", tiny, "--gpu", "Voodoo 2")
    assert r.returncode == 2 and "unknown GPU" in r.stderr


def test_plan_finetune_gpt2_xl_lora_fits_24gb_and_full_does_not():
    """The shipped XL LoRA config fits a 24 GB card; full fine-tuning of 1.56B (16 B/param) cannot."""
    from pathlib import Path

    from gptcore.config import load_config
    from gptcore.training.plan import plan_finetune

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpt2-xl-lora.yaml")
    p = plan_finetune(cfg, gpu="RTX 4090")
    # LoRA r=16 on c_attn (1600→4800), attn c_proj (1600→1600), c_fc (1600→6400), mlp c_proj (6400→1600), 48 layers
    assert p["trainable_params"] == 48 * 16 * ((1600 + 4800) + (1600 + 1600) + (1600 + 6400) + (6400 + 1600))
    assert p["params"] == 1_557_611_200
    assert p["fits"] and p["memory_gib"]["total"] < 24
    assert abs(p["memory_gib"]["weights"] - 1_557_611_200 * 2 / 1024**3) < 1e-6  # bf16 frozen base
    full = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpt2-xl-lora.yaml", ["finetune.method=full"])
    q = plan_finetune(full, gpu="RTX 4090")
    assert not q["fits"] and q["recommendation"] is None
