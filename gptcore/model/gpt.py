"""The GPT model: GPT-2 as in the paper, plus the few variants newer models made popular.

Read top to bottom: the config and its presets, the pieces (norms, position encodings, attention,
MLPs) each its own small class picked from a registry, the `Block`, and `GPT` itself with
generation. Module names follow nanoGPT (and so OpenAI's checkpoint): `transformer.wte`,
`transformer.h[i].attn.c_attn`, ..., `lm_head`, and every projection is a plain `nn.Linear`, so
LoRA can wrap it and `gptcore.convert.hf` can map GPT-2's weights one to one.

Shapes: B batch, T time (tokens), C channels (n_embd), nh heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptcore.errors import ConfigError


# ----------------------------------------------------------------------------- config
# GPTConfig and PRESETS live in model/gptconfig.py (plain data, no torch), so reading a config file
# — `gptcore prepare`, a cached `gptcore run` — never pays for importing torch.

from gptcore.model.gptconfig import ATTN_IMPLS, MLP_NAMES, NORM_NAMES, POSITIONS, PRESETS, GPTConfig  # noqa: E402,F401


# ----------------------------------------------------------------------------- norms


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 has one; `bias=False` drops it)."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight — LayerNorm without centring or bias (Llama)."""

    def __init__(self, dim: int, bias: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}
assert tuple(NORMS) == NORM_NAMES, "list a new norm in gptconfig.NORM_NAMES too"


# ----------------------------------------------------------------------------- positions


def rope_tables(hs: int, start: int | torch.Tensor, T: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angle (position · theta^(-2i/hs)) for positions start..start+T-1: each (T, hs/2).
    `start` may be a (1,) tensor (a static decode step: T = 1)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)
    pos = torch.arange(T, device=device, dtype=torch.float32) + start
    angle = torch.outer(pos, inv_freq)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1[i], x2[i]) of x (B, h, T, hs) by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, h, T, hs/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# ----------------------------------------------------------------------------- attention


class KVCache:
    """Keys and values of every layer, preallocated once: k[i], v[i] are (B, nkv, max_len, hs).

    `pos` counts the tokens already stored; a forward pass with the cache writes its T new keys
    and values at pos..pos+T-1 and attends over 0..pos+T-1, then `GPT.hidden` advances `pos`.

    `GPT.decode_step` uses it with static shapes instead (what torch.compile wants): the new
    key goes in at a position held in a tensor (`at`), and attention runs over all max_len slots
    with the unwritten ones masked out (`visible`). The buffers start zeroed, so a masked slot
    is 0, never an uninitialised NaN that 0 · NaN would spread.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_kv_head, max_len, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len, self.pos = max_len, 0
        self.at: torch.Tensor | None = None  # (1,) position a static decode step writes
        self.visible: torch.Tensor | None = None  # (1, max_len) bool: the slots 0..at it attends to


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection (`c_attn`)."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_size
        self.layer_idx, self.impl, self.dropout = layer_idx, config.attn_impl, config.dropout
        # q has n_head heads, k and v n_kv_head each (fewer under grouped-query attention)
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.hs, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hs), RMSNorm(self.hs)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        visible = None  # an explicit (T, S) mask of the keys each query sees, when not plain causal
        if cache is not None and cache.at is not None:  # static decode step: one slot written, all masked-attended
            cache.k[self.layer_idx].index_copy_(2, cache.at, k)
            cache.v[self.layer_idx].index_copy_(2, cache.at, v)
            k, v, visible = cache.k[self.layer_idx], cache.v[self.layer_idx], cache.visible  # (B, nkv, max_len, hs)
        elif cache is not None:  # append to this layer's cache, attend over everything stored so far
            p = cache.pos
            cache.k[self.layer_idx][:, :, p:p + T] = k
            cache.v[self.layer_idx][:, :, p:p + T] = v
            k, v = cache.k[self.layer_idx][:, :, :p + T], cache.v[self.layer_idx][:, :, :p + T]  # (B, nkv, S, hs)
        S = k.size(2)  # keys: S >= T; query t sits at absolute position S-T+t
        dropout = self.dropout if self.training else 0.0

        if self.impl == "math":
            if self.n_kv_head != self.n_head:  # each kv head serves n_head/n_kv_head query heads
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, S, hs)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hs))  # (B, nh, T, S)
            if visible is None:
                visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)  # query t sees keys <= S-T+t
            att = att.masked_fill(~visible, float("-inf"))
            att = F.softmax(att.float(), dim=-1).type_as(q)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, S) x (B, nh, S, hs) -> (B, nh, T, hs)
        else:
            # the same computation as the "math" branch in one fused kernel (flash / memory-efficient)
            is_causal = visible is None and T == S
            if visible is None and T != S and T > 1:  # a chunk after a cached prefix: explicit bottom-right causal mask
                visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout, is_causal=is_causal,
                                               enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh*hs): heads side by side
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- MLPs


class MLP(nn.Module):
    """GPT-2's feed-forward: widen 4x, GELU (tanh approximation, as OpenAI's), project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


def swiglu_hidden(n_embd: int) -> int:
    """SwiGLU's hidden width: 8/3·C rounded up to a multiple of 64 (a 4x GELU MLP's parameter count)."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


class SwiGLU(nn.Module):
    """Llama's feed-forward: silu(x·W_gate) ⊙ (x·W_up), then down. `c_fc` holds gate and up fused.

    Hidden width 8/3·C (rounded up to a multiple of 64) keeps the parameter count of a 4x GELU MLP.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = swiglu_hidden(config.n_embd)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.dropout(self.c_proj(F.silu(gate) * up))


class ReLU2(MLP):
    """The squared-ReLU feed-forward (So et al. 2021, "Primer"; modded-nanogpt): widen 4x, relu(h)², project back.

    GPT-2's MLP with another nonlinearity: relu(h)² is cheaper than GELU and learned faster in Primer's search.
    """

    def forward(self, x):
        return self.dropout(self.c_proj(F.relu(self.c_fc(x)).square()))


MLPS = {"gelu": MLP, "swiglu": SwiGLU, "relu2": ReLU2}
assert tuple(MLPS) == MLP_NAMES, "list a new MLP in gptconfig.MLP_NAMES too"


# ----------------------------------------------------------------------------- block and model


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = NORMS[config.norm](config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = NORMS[config.norm](config.n_embd, bias=config.bias)
        self.mlp = MLPS[config.mlp](config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        self.decode_compiled = False  # set by compile_decode
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=NORMS[config.norm](config.n_embd, bias=config.bias),
        ))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:  # one matrix embeds tokens and scores the next one
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual projections N(0, 0.02/√(2·n_layer)), zero biases."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, (LayerNorm, RMSNorm)):
                m.reset_parameters()

    # -- sizes and cost

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix counted once. non_embedding drops the position table and an
        untied token table (lookups, not compute); a tied wte stays, as it is also the lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, PaLM's estimate (appendix B), as nanoGPT:
        6·N for the weight matmuls (N = non-embedding params) + 12·L·H·Q·T for attention scores and
        values (L layers, H heads, Q head size, T = seq_len or block_size)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    def mfu(self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops

    # -- forward

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) of token ids idx (B, T)."""
        cfg = self.config
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if cfg.pos == "learned" and start + T > cfg.block_size:
            raise ConfigError(f"sequence of {start + T} tokens is longer than block_size {cfg.block_size}",
                              "model.block_size", "crop the input or use a larger block_size")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))  # (T, C) broadcast
        else:
            rope = rope_tables(cfg.head_size, start, T, cfg.rope_theta, idx.device)  # ((T, hs/2), (T, hs/2))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def decode_step(self, tok: torch.Tensor, cache: KVCache, at: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after one token per row, tok (B, 1), standing at position `at` (a (1,) long tensor).

        The same computation as `self(tok, kv_cache=cache)` but with static shapes: every step sees
        tensors of the same sizes (the whole cache, a mask of the written slots), so a compiled
        step (`compile_decode`) is traced once. Does not advance `cache.pos`; the caller does.
        """
        cache.at, cache.visible = at, (torch.arange(cache.max_len, device=tok.device) <= at)[None]  # (1, max_len)
        try:
            return self._decode(tok, cache)
        finally:
            cache.at = cache.visible = None

    def _decode(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cfg = self.config
        x = self.transformer.wte(tok)  # (B, 1, C)
        rope = None
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(cache.at)
        else:
            rope = rope_tables(cfg.head_size, cache.at, 1, cfg.rope_theta, tok.device)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        return self.logits(self.transformer.ln_f(x[:, -1]))  # (B, V)

    def compile_decode(self, **options) -> None:
        """Decode through `torch.compile` from now on (`generate` and `decode_step`): worth it for long
        generations only; see BENCHMARKS.md for the measured break-even on CPU."""
        self._decode = torch.compile(self._decode, fullgraph=True, dynamic=False, **options)
        self.decode_compiled = True  # generate then sizes every cache block_size long: one shape, one compilation

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) of hidden states h (..., C); with `logit_softcap` c they are
        squashed smoothly into (−c, c): c · tanh(z / c) ≈ z for |z| ≪ c, so no logit runs away."""
        z = self.lm_head(h)
        cap = self.config.logit_softcap
        return z if cap is None else cap * torch.tanh(z / cap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """Logits (B, T, vocab) for every position, and the mean cross-entropy against targets (B, T)
        if given (positions with target -100 are ignored), else None."""
        logits = self.logits(self.hidden(idx, kv_cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -- generation

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, eos_id: int | None = None,
                        generator: torch.Generator | None = None, use_cache: bool = True, *,
                        repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> Iterator[torch.Tensor]:
        """Yield the next token (B, 1) of each row, one step at a time.

        The prompt is run once through a preallocated KV cache, then each step feeds only the new
        token. When the sequence outgrows the cache (block_size), every further step recomputes
        the last block_size tokens from scratch (a cropped window). A row that produced `eos_id`
        keeps emitting eos_id; generation stops once every row has. `repetition_penalty` and
        `no_repeat_ngram_size` (off by default) reshape the logits first: see `penalize`.
        """
        cfg = self.config
        was_training = self.training
        self.eval()
        try:
            B, T = idx.shape
            cache = None
            if use_cache:
                param = next(self.parameters())
                size = cfg.block_size if self.decode_compiled else min(T + max_new_tokens, cfg.block_size)
                cache = KVCache(cfg, B, size, idx.device, param.dtype)
            seq, feed = idx, idx  # everything so far; what the cache has not seen yet
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            at = torch.zeros(1, dtype=torch.long, device=idx.device)
            for _ in range(max_new_tokens):
                if cache is not None and cache.pos > 0 and cache.pos < cache.max_len:  # one token: static step
                    logits = self.decode_step(feed, cache, at.fill_(cache.pos))
                    cache.pos += 1
                elif cache is not None and cache.pos + feed.size(1) <= cache.max_len:  # the prompt
                    logits = self.logits(self.hidden(feed, kv_cache=cache)[:, -1])  # (B, V)
                else:
                    cache = None
                    logits = self.logits(self.hidden(seq[:, -cfg.block_size:])[:, -1])
                logits = penalize(logits.float(), seq, repetition_penalty, no_repeat_ngram_size)  # (B, V)
                tok = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
                if eos_id is not None:
                    tok = torch.where(done[:, None], torch.full_like(tok, eos_id), tok)
                    done |= tok[:, 0] == eos_id
                seq, feed = torch.cat([seq, tok], dim=1), tok
                yield tok
                if eos_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, **penalties) -> torch.Tensor:
        """idx (B, T) followed by up to max_new_tokens sampled tokens: (B, T + new).
        `penalties`: repetition_penalty, no_repeat_ngram_size (generate_stream)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, use_cache,
                                        **penalties))
        return torch.cat([idx, *new], dim=1)


def penalize(logits: torch.Tensor, seq: torch.Tensor, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Logits (B, V) of the token after `seq` (B, T), discouraged from repeating what `seq` holds
    (the prompt included), as transformers' RepetitionPenalty and NoRepeatNGram logits processors do:

    repetition_penalty p  (1 = off; CTRL's penalty) a logit of a token already in seq is divided
                          by p when positive, multiplied by p when negative
    no_repeat_ngram_size n (0 = off) a token that would complete an n-gram already in seq gets -inf
    """
    if repetition_penalty != 1.0:
        seen = logits.gather(1, seq)  # (B, T)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, seq, seen)
    n = no_repeat_ngram_size
    if n > 0 and seq.size(1) >= n - 1:
        logits = logits.clone()
        for b, row in enumerate(seq.tolist()):
            prefix = row[len(row) - n + 1:] if n > 1 else []  # the n-1 tokens the next one would extend
            banned = {row[i + n - 1] for i in range(len(row) - n + 1) if row[i:i + n - 1] == prefix}
            logits[b, list(banned)] = float("-inf")
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V): greedy at temperature 0, else sample from the
    softmax of logits/temperature restricted to the top_k tokens and the top_p probability mass."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # the tokens before already hold top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def build_model(config: GPTConfig, device="cpu", dtype: torch.dtype | None = None) -> GPT:
    """Build on the meta device (no memory), then materialise once on `device` with GPT-2 init,
    so even gpt2-xl allocates its 1.5B parameters exactly one time."""
    with torch.device("meta"):
        model = GPT(config)
    if dtype is not None:
        model = model.to(dtype)  # still meta: free
    model.to_empty(device=device)
    model.tie_weights()  # to_empty made fresh tensors for both names of the tied matrix
    model.init_weights()
    return model
