"""The model against references: exact GPT-2 sizes, attention vs a float64 recomputation,
KV-cache generation vs recomputing everything, every variant learns."""

import math

import pytest
import torch

from gptcore.errors import ConfigError
from gptcore.model.gpt import GPT, GPTConfig, KVCache, build_model, sample

torch.set_num_threads(1)  # tiny tensors: threads only add overhead


def small(**kw):
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


VARIANTS = {
    "gpt2": {},
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "rope": dict(pos="rope"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "qk_norm": dict(qk_norm=True),
    "untied_nobias": dict(tie_embeddings=False, bias=False),
    "math": dict(attn_impl="math"),
    "relu2": dict(mlp="relu2"),
    "softcap": dict(logit_softcap=3.0),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, bias=False, tie_embeddings=False, qk_norm=True),
}


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_param_counts_exact(name, count):
    with torch.device("meta"):
        model = GPT(GPTConfig.preset(name))
    assert model.num_params() == count
    assert model.lm_head.weight is model.transformer.wte.weight


def test_cpu_presets_and_overrides():
    assert GPTConfig.preset("tiny", vocab_size=8192).to_dict() | {} == GPTConfig(
        vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256).to_dict()
    s = GPTConfig.preset("small")
    assert (s.n_layer, s.n_head, s.n_embd) == (6, 6, 384)
    ll = GPTConfig.preset("llama-style")
    assert (ll.norm, ll.mlp, ll.pos) == ("rmsnorm", "swiglu", "rope") and ll.n_kv_head < ll.n_head
    assert GPTConfig.from_dict(ll.to_dict()) == ll
    for bad in [dict(name="nope"), dict(name="tiny", n_head=3), dict(name="tiny", norm="batchnorm"),
                dict(name="tiny", n_kv_head=3)]:
        with pytest.raises(ConfigError):
            GPTConfig.preset(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        GPTConfig.from_dict({**s.to_dict(), "n_layers": 3})


def test_build_model_gpt2_init():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=2000, block_size=64, n_layer=8, n_head=4, n_embd=128)
    m = build_model(cfg)
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert m.lm_head.weight is m.transformer.wte.weight
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(m.transformer.h[3].attn.c_proj.weight.std().item() - resid) < 5e-4
    assert abs(m.transformer.h[3].mlp.c_proj.weight.std().item() - resid) < 5e-4
    assert torch.all(m.transformer.h[0].attn.c_attn.bias == 0) and torch.all(m.transformer.ln_f.weight == 1)
    m16 = build_model(cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}


def test_flops_and_mfu():
    m = build_model(GPTConfig.preset("tiny", vocab_size=8192))
    cfg = m.config
    n = m.num_params(non_embedding=True)
    assert n == m.num_params() - cfg.block_size * cfg.n_embd  # tied wte stays in: it is the lm_head
    assert m.flops_per_token() == 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * cfg.block_size
    assert m.mfu(1000.0, 1e12) == pytest.approx(m.flops_per_token() * 1000 / 1e12)


# ------------------------------------------------------------------ attention vs float64


def reference_attention(attn, x, pos_start=0, rope_theta=None):
    """Causal multi-head attention recomputed in float64 with explicit loops over heads."""
    x = x.double()
    B, T, C = x.shape
    nh, nkv, hs = attn.n_head, attn.n_kv_head, attn.hs
    W, b = attn.c_attn.weight.double(), attn.c_attn.bias
    qkv = x @ W.T + (b.double() if b is not None else 0)
    q, k, v = qkv[..., : nh * hs], qkv[..., nh * hs: (nh + nkv) * hs], qkv[..., (nh + nkv) * hs:]
    heads = []
    for h in range(nh):
        g = h // (nh // nkv)  # the kv head this query head reads
        qh, kh, vh = q[..., h * hs:(h + 1) * hs], k[..., g * hs:(g + 1) * hs], v[..., g * hs:(g + 1) * hs]
        if attn.q_norm is not None:
            rms = lambda t, w: t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * w.double()  # noqa: E731
            qh, kh = rms(qh, attn.q_norm.weight), rms(kh, attn.k_norm.weight)
        if rope_theta is not None:  # rotate pairs (i, i + hs/2) as complex numbers by pos * theta^(-2i/hs)
            freq = rope_theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
            rot = torch.polar(torch.ones(T, hs // 2, dtype=torch.float64),
                              torch.arange(pos_start, pos_start + T, dtype=torch.float64)[:, None] * freq)
            cplx = lambda t: torch.complex(t[..., : hs // 2], t[..., hs // 2:]) * rot  # noqa: E731
            qh, kh = (torch.cat([c.real, c.imag], -1) for c in (cplx(qh), cplx(kh)))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(hs)  # (B, T, T)
        future = torch.arange(T)[None, :] > torch.arange(T)[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ vh)
    y = torch.cat(heads, -1)
    Wp, bp = attn.c_proj.weight.double(), attn.c_proj.bias
    return y @ Wp.T + (bp.double() if bp is not None else 0)


@pytest.mark.parametrize("variant", ["gpt2", "gqa", "mqa", "qk_norm", "rope", "untied_nobias"])
def test_attention_math_and_sdpa_match_float64(variant):
    torch.manual_seed(0)
    kw = VARIANTS[variant]
    x = torch.randn(3, 17, 32)
    outs = {}
    for impl in ("math", "sdpa"):
        torch.manual_seed(1)
        m = build_model(small(attn_impl=impl, **kw)).eval()
        attn = m.transformer.h[0].attn
        if attn.q_norm is not None:  # non-trivial norm weights
            attn.q_norm.weight.data.uniform_(0.5, 1.5), attn.k_norm.weight.data.uniform_(0.5, 1.5)
        rope = None
        if m.config.pos == "rope":
            from gptcore.model.gpt import rope_tables
            rope = rope_tables(attn.hs, 0, 17, m.config.rope_theta, "cpu")
        with torch.no_grad():
            outs[impl] = attn(x, rope)
            ref = reference_attention(attn, x, 0, m.config.rope_theta if rope else None)
        assert (outs[impl].double() - ref).abs().max() < 1e-5, impl
    assert (outs["math"] - outs["sdpa"]).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_kv_cache_chunks_equal_full_forward(impl, variant):
    """Prefill 7 tokens, then a 5-token chunk (explicit bottom-right mask), then single tokens."""
    torch.manual_seed(0)
    m = build_model(small(**{**VARIANTS[variant], "attn_impl": impl})).eval()
    idx = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        full = m(idx)[0]
        cache = KVCache(m.config, 2, 32, "cpu", torch.float32)
        parts = [m(idx[:, :7], kv_cache=cache)[0], m(idx[:, 7:12], kv_cache=cache)[0]]
        parts += [m(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(12, 15)]
    assert cache.pos == 15
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("variant", ["gpt2", "llama", "gqa"])
def test_static_decode_steps_equal_full_forward(impl, variant):
    """decode_step (static shapes: the whole zeroed cache, a mask of the written slots) after a prefill
    gives the full forward's logits at every position, and leaves cache.pos to the caller."""
    torch.manual_seed(0)
    m = build_model(small(**{**VARIANTS[variant], "attn_impl": impl})).eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = m(idx)[0]
        cache = KVCache(m.config, 2, 20, "cpu", torch.float32)
        parts = [m(idx[:, :5], kv_cache=cache)[0][:, -1]]
        for t in range(5, 12):
            parts.append(m.decode_step(idx[:, t:t + 1], cache, torch.tensor([t])))
            assert cache.pos == t and cache.at is None
            cache.pos += 1
    assert (torch.stack(parts, 1) - full[:, 4:]).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_decode_step_generates_the_same_tokens():
    torch.manual_seed(0)
    m = build_model(small(n_layer=1)).eval()
    idx = torch.randint(0, 97, (2, 5))
    ref = m.generate(idx, 12, temperature=0, use_cache=False)
    m.compile_decode()
    assert torch.equal(m.generate(idx, 12, temperature=0), ref)


# ------------------------------------------------------------------ forward, loss, training


def test_forward_shapes_and_loss_matches_cross_entropy():
    torch.manual_seed(0)
    m = build_model(small())
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    targets[0, :4] = -100
    logits, loss = m(idx, targets)
    assert logits.shape == (2, 9, 97) and m(idx)[1] is None
    keep = targets != -100
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert abs(loss.item() - ref.item()) < 1e-5
    h = m.hidden(idx)
    assert h.shape == (2, 9, 32) and torch.allclose(m.lm_head(h), logits)
    with pytest.raises(ConfigError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_learns(variant):
    torch.manual_seed(0)
    m = build_model(small(**VARIANTS[variant]))
    x = torch.randint(0, 97, (4, 16))
    y = torch.roll(x, -1, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(97) - 0.3  # starts near uniform
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = build_model(small(pos="rope", dropout=0.0))
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for flag in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = flag
        m(x, x)[1].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("variant", ["gpt2", "llama", "math"])
def test_kv_cache_generation_token_identical(variant):
    torch.manual_seed(0)
    m = build_model(small(**VARIANTS[variant]))
    idx = torch.randint(0, 97, (3, 5))
    # greedy, and sampling with the same generator seed; 40 new tokens runs past block_size 32
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20), dict(temperature=0.9, top_p=0.8)):
        a = m.generate(idx, 40, generator=torch.Generator().manual_seed(3), **kw)
        b = m.generate(idx, 40, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
        assert a.shape == (3, 45) and torch.equal(a, b), kw
        assert torch.equal(a[:, :5], idx)
    assert m.training  # generation restores the mode


def test_generation_past_block_size_uses_cropped_window():
    torch.manual_seed(0)
    m = build_model(small(block_size=8)).eval()
    idx = torch.randint(0, 97, (1, 6))
    out = m.generate(idx, 10, temperature=0)
    seq = idx
    for _ in range(10):  # the definition: next token = argmax of the last block_size tokens
        nxt = m(seq[:, -8:])[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_stream_and_eos():
    torch.manual_seed(0)
    m = build_model(small())
    idx = torch.randint(0, 97, (2, 4))
    full = m.generate(idx, 12, temperature=0)
    toks = list(m.generate_stream(idx, 12, temperature=0))
    assert all(t.shape == (2, 1) for t in toks) and torch.equal(torch.cat([idx, *toks], 1), full)
    eos = int(full[0, 6])  # row 0's 3rd new token
    out = m.generate(idx, 12, temperature=0, eos_id=eos)
    first = [int((row[4:] == eos).nonzero()[0]) if (row[4:] == eos).any() else None for row in full]
    stop = max(f if f is not None else 11 for f in first) + 1
    assert out.shape[1] == 4 + stop
    assert torch.all(out[0, 4 + first[0]:] == eos)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]).log_softmax(-1)
    assert sample(logits, temperature=0).item() == 4
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks <= {3, 4}
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    picks = {sample(probs.log(), 1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: exactly the two most likely
    picks = {sample(probs.log(), 1.0, top_p=0.45, generator=g).item() for _ in range(100)}
    assert picks == {0}


def test_relu2_mlp_and_logit_softcap_match_their_formulas():
    """ReLU²: c_proj(max(0, c_fc x)²); soft-capping: c·tanh(z/c) of the plain head's logits — in float64."""
    torch.manual_seed(0)
    m = build_model(small(mlp="relu2", logit_softcap=2.0)).eval()
    mlp, x = m.transformer.h[0].mlp, torch.randn(2, 5, 32)
    h = x.double() @ mlp.c_fc.weight.double().T + mlp.c_fc.bias.double()
    want = (h.clamp(min=0) ** 2) @ mlp.c_proj.weight.double().T + mlp.c_proj.bias.double()
    assert torch.allclose(mlp(x).double(), want, atol=1e-5)
    idx = torch.randint(0, 97, (2, 7))
    z = m.lm_head(m.hidden(idx)).double()
    logits, _ = m(idx)
    assert torch.allclose(logits.double(), 2.0 * torch.tanh(z / 2.0), atol=1e-6)
    assert logits.abs().max() < 2.0
    with pytest.raises(ConfigError, match="logit_softcap"):
        small(logit_softcap=-1.0)
