"""Project 2 — the transformer: attention, blocks and GPT itself (docs/02-attention.md), and the
Project 4 pieces that act on a built model (docs/04-gpt2.md, docs/05-finetuning.md).

    gpt.py       GPTConfig and its presets; norms, position encodings, CausalSelfAttention, MLPs,
                 Block, GPT (forward, loss, KV-cache generation) — read it top to bottom
    lora.py      low-rank adapters around any nn.Linear, merged back for export
    generate.py  streaming text generation for the CLI
    folder.py    a model folder on disk: config.json + model.safetensors + tokenizer/, sha256-verified
"""

from gptcore.model.folder import load_model, model_sha256, read_config, save_model
from gptcore.model.gpt import (GPT, MLP, MLPS, NORMS, PRESETS, Block, CausalSelfAttention, GPTConfig, KVCache, LayerNorm,
                               RMSNorm, SwiGLU, apply_rope, build_model, rope_tables, sample)

__all__ = ["GPT", "MLP", "MLPS", "NORMS", "PRESETS", "Block", "CausalSelfAttention", "GPTConfig", "KVCache", "LayerNorm",
           "RMSNorm", "SwiGLU", "apply_rope", "build_model", "load_model", "model_sha256", "read_config", "rope_tables",
           "sample", "save_model"]
