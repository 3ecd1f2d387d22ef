"""GPTConfig and its presets: the model's shape as plain data (read by gpt.py; docs/02-attention.md).

Kept apart from gpt.py, without torch, because the config file's `model:` section is derived from
these fields (gptcore/config.py): loading a config must not import torch. gpt.py re-exports every
name, so `from gptcore.model.gpt import GPTConfig` reads as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from gptcore.errors import ConfigError

POSITIONS = ("learned", "rope")  # a wpe table, or rotary inside attention
ATTN_IMPLS = ("sdpa", "math")  # the fused kernel, or the written-out softmax(QK^T/sqrt(hs))V
NORM_NAMES = ("layernorm", "rmsnorm")  # the keys of gpt.NORMS (gpt.py checks they agree)
MLP_NAMES = ("gelu", "swiglu", "relu2")  # the keys of gpt.MLPS

@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the model sees (learned positions stop here)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    norm: str = "layernorm"  # NORM_NAMES (gpt.NORMS)
    mlp: str = "gelu"  # MLP_NAMES (gpt.MLPS)
    pos: str = "learned"  # "learned" (wpe table) | "rope" (rotary, inside attention)
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (plain multi-head)
    qk_norm: bool = False  # RMS-normalise queries and keys per head before the dot product
    tie_embeddings: bool = True  # lm_head.weight is wte.weight
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) | "math" (written out)
    rope_theta: float = 10000.0
    logit_softcap: float | None = None  # logits = cap · tanh(logits / cap) (Gemma 2, modded-nanogpt); None: off

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        checks = [
            (self.n_embd % self.n_head == 0, "n_embd", "n_embd must be a multiple of n_head"),
            (self.n_head % self.n_kv_head == 0, "n_kv_head", "n_head must be a multiple of n_kv_head"),
            (self.norm in NORM_NAMES, "norm", f"choose one of {sorted(NORM_NAMES)}"),
            (self.mlp in MLP_NAMES, "mlp", f"choose one of {sorted(MLP_NAMES)}"),
            (self.pos in POSITIONS, "pos", f"choose one of {POSITIONS}"),
            (self.attn_impl in ATTN_IMPLS, "attn_impl", f"choose one of {ATTN_IMPLS}"),
            (self.pos != "rope" or (self.n_embd // self.n_head) % 2 == 0, "pos", "rope needs an even head size"),
            (self.logit_softcap is None or self.logit_softcap > 0, "logit_softcap", "a positive cap, or null for none"),
            (min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_kv_head) > 0,
             "model", "sizes must be positive"),
        ]
        for ok, where, fix in checks:
            if not ok:
                raise ConfigError(f"invalid model config {self.to_dict()}", f"model.{where}", fix)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}", "config.json", f"known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named size, e.g. `GPTConfig.preset("gpt2-medium")`, with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}", "model.preset", f"choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # OpenAI's four GPT-2 sizes (vocab 50257, context 1024)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # CPU-sized
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    # the Llama recipe at `small` size: RMSNorm, SwiGLU, rotary positions, 3 query heads per kv head
    "llama-style": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, n_kv_head=2, norm="rmsnorm",
                        mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
}
