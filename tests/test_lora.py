"""LoRA: the math against float64 and against Hugging Face peft, merging, gradients, adapter files."""

import json
import math

import pytest
import torch
import torch.nn as nn

from gptcore.errors import CheckpointError, ConfigError
from gptcore.model.lora import (
    LoRALinear,
    apply_adapter,
    apply_lora,
    load_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    read_adapter_meta,
    save_adapter,
)

torch.set_num_threads(1)


def _randomize_B(model, seed=0):
    """B starts at zero (the adapted model equals the base); give it values so the update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _tiny_gpt(seed=0):
    from gptcore.model.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()


class Toy(nn.Module):
    """Two blocks named like GPT's so the default targets find them, plus an untargeted head."""

    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.attn = nn.Module()
            blk.attn.c_attn, blk.attn.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)
            blk.mlp = nn.Module()
            blk.mlp.c_fc, blk.mlp.c_proj = nn.Linear(8, 32), nn.Linear(32, 8)
            self.h.append(blk)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        for blk in self.h:
            q = blk.attn.c_attn(x)[..., :8]
            x = x + blk.attn.c_proj(torch.tanh(q))
            x = x + blk.mlp.c_proj(torch.relu(blk.mlp.c_fc(x)))
        return self.head(x)


# --------------------------------------------------------------------------------------------
# the layer


def test_lora_linear_is_the_formula_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(12, 7).double()
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert A.shape == (3, 12) and B.shape == (7, 3)


def test_init_B_zero_makes_the_adapted_layer_equal_the_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 16)
    layer = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 64)
    assert torch.equal(layer.lora_B, torch.zeros(16, 4))
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    # kaiming_uniform(a=√5) on (r, in) is U(±1/√in), like nn.Linear's weight and peft's lora_A
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_must_be_positive(rank):
    with pytest.raises(ConfigError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=rank, alpha=1.0)
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(Toy(), rank=rank, alpha=1.0)


def test_targets_must_exist_and_be_linear():
    with pytest.raises(ConfigError, match="no module matches"):
        apply_lora(Toy(), rank=2, alpha=2, targets=["attn.nope"])
    with pytest.raises(ConfigError, match="not nn.Linear"):
        apply_lora(Toy(), rank=2, alpha=2, targets=["attn"])


# --------------------------------------------------------------------------------------------
# against Hugging Face peft


def _peft_lora_AB(peft_model, module_name):
    """peft keeps lora_A / lora_B as nn.Linear layers; their .weight is our (r, in) / (out, r) matrix."""
    m = peft_model.get_submodule(f"base_model.model.{module_name}")
    return m.lora_A["default"].weight, m.lora_B["default"].weight


def test_matches_peft_on_plain_linears():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ours, ref = Toy(), Toy()
    ref.load_state_dict(ours.state_dict())
    apply_lora(ours, rank=4, alpha=8.0)
    _randomize_B(ours)
    ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8.0, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0))
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            A, B = _peft_lora_AB(ref, name)
            A.copy_(m.lora_A)
            B.copy_(m.lora_B)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    assert sorted(k for k in lora_state_dict(ours)) == sorted(
        n.replace("base_model.model.", "").replace(".default.weight", "") for n, _ in ref.named_parameters() if "lora_" in n
    )


def test_matches_peft_on_converted_hf_gpt2(tmp_path):
    """Same A and B → same logits: our LoRA on our GPT (converted from HF) vs peft on the HF model."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcore.convert.hf import load_hf_gpt2

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_gpt2(tmp_path / "hf")
    ours = ours[0] if isinstance(ours, tuple) else ours
    ours.eval()
    apply_lora(ours, rank=4, alpha=16.0)
    _randomize_B(ours, seed=1)

    # GPT-2's projections are Conv1D (weight stored (in, out)): peft needs fan_in_fan_out=True
    ref = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16.0, target_modules=["c_attn", "c_proj", "c_fc"],
                                        fan_in_fan_out=True, lora_dropout=0.0))
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            A, B = _peft_lora_AB(ref, name)  # same module names: transformer.h.0.attn.c_attn, ...
            assert A.shape == m.lora_A.shape and B.shape == m.lora_B.shape
            A.copy_(m.lora_A)  # lora_A.weight (r, in), lora_B.weight (out, r): no transpose needed
            B.copy_(m.lora_B)
    assert len(lora_modules(ours)) == 2 * 4
    idx = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = ours(idx)
        want = ref(input_ids=idx).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the adapters really changed the output (B ≠ 0), so the comparison above is not vacuous
    with ref.disable_adapter(), torch.no_grad():
        plain = ref(input_ids=idx).logits
    assert (plain - want).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# merging, gradients


def test_merge_equals_unmerged_and_leaves_plain_linears():
    model = _tiny_gpt()
    apply_lora(model, rank=4, alpha=8)
    _randomize_B(model)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, _ = model(idx)
    merge_lora(model)
    assert not lora_modules(model)
    assert all(type(model.get_submodule(f"transformer.h.{i}.{t}")) is nn.Linear
               for i in range(2) for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert not any("lora_" in k or ".base." in k for k in model.state_dict())
    with torch.no_grad():
        after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_merge_matches_W_plus_scaled_BA_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(10, 6).double()
    W0 = base.weight.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merged()
    torch.testing.assert_close(merged.weight, W0 + 1.5 * layer.lora_B @ layer.lora_A, rtol=1e-12, atol=1e-12)


def test_only_adapter_weights_get_gradients():
    model = _tiny_gpt().train()
    apply_lora(model, rank=2, alpha=4)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        is_lora = name.endswith(".lora_A") or name.endswith(".lora_B")
        assert p.requires_grad == is_lora, name
        if is_lora:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B = 0 at init, so A's gradient is zero but B's is not (dL/dB = s · (x Aᵀ)ᵀ dL/dy)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_bf16_base_keeps_float32_adapters():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=2)
    assert layer.lora_A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# adapter files


def test_adapter_save_load_round_trip(tmp_path):
    model = _tiny_gpt()
    apply_lora(model, rank=4, alpha=8)
    _randomize_B(model)
    save_adapter(model, tmp_path / "adapter", base_sha256="ab" * 32)
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["base_sha256"] == "ab" * 32
    assert meta["targets"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert not list(tmp_path.glob(".*tmp"))

    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, _ = model(idx)
    fresh = _tiny_gpt()  # same base weights (same seed), no adapters: load_lora applies them from adapter.json
    load_lora(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got, _ = fresh(idx)
    assert torch.equal(got, want)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[k], v)


def test_adapter_rejects_a_different_base_and_corruption(tmp_path, monkeypatch):
    import gptcore.model.folder as checkpoint

    model = _tiny_gpt()
    apply_lora(model, rank=2, alpha=2)
    save_adapter(model, tmp_path / "adapter", base_sha256="aa" * 32)
    monkeypatch.setattr(checkpoint, "model_sha256", lambda d: "bb" * 32)
    with pytest.raises(CheckpointError, match="trained on base"):
        apply_adapter(_tiny_gpt(), tmp_path / "adapter", base_dir=tmp_path / "base")
    monkeypatch.setattr(checkpoint, "model_sha256", lambda d: "aa" * 32)
    apply_adapter(_tiny_gpt(), tmp_path / "adapter", base_dir=tmp_path / "base")  # the right base loads

    w = tmp_path / "adapter" / "adapter.safetensors"
    blob = w.read_bytes()
    w.write_bytes(blob[:-8] + bytes(b ^ 0xFF for b in blob[-8:]))  # flip the last 8 bytes
    with pytest.raises(CheckpointError, match="sha256"):
        read_adapter_meta(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="adapter.json not found"):
        apply_adapter(_tiny_gpt(), tmp_path)


def test_adapter_rank_mismatch_is_a_checkpoint_error(tmp_path):
    model = _tiny_gpt()
    apply_lora(model, rank=2, alpha=2)
    save_adapter(model, tmp_path / "a", base_sha256=None)
    other = apply_lora(_tiny_gpt(), rank=3, alpha=2)
    with pytest.raises(CheckpointError, match="shape"):
        load_lora(other, tmp_path / "a")


def test_lora_parameter_formula_matches_a_wrapped_gpt2_xl_on_meta():
    """The count memory_estimate uses = what apply_lora really adds to GPT-2 XL (built on meta: no memory)."""
    from gptcore.training.plan import lora_param_count
    from gptcore.model.gpt import GPT, GPTConfig

    for name, rank in (("gpt2-xl", 16), ("llama-style", 4)):
        cfg = GPTConfig.preset(name, vocab_size=50257)
        with torch.device("meta"):
            model = GPT(cfg)
        apply_lora(model, rank=rank, alpha=2 * rank)
        got = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert got == lora_param_count(cfg, rank), name
    assert lora_param_count(GPTConfig.preset("gpt2-xl", vocab_size=50257), 16) == 19_660_800
