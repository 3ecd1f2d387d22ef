"""Project 2 — the transformer: attention, blocks and GPT itself (docs/02-attention.md), and the
Project 4 pieces that act on a built model (docs/04-gpt2.md, docs/05-finetuning.md).

    gpt.py       GPTConfig and its presets; norms, position encodings, CausalSelfAttention, MLPs,
                 Block, GPT (forward, loss, KV-cache generation) — read it top to bottom
    lora.py      low-rank adapters around any nn.Linear, merged back for export
    generate.py  streaming text generation for the CLI
    gptconfig.py GPTConfig and PRESETS as plain data (no torch: the config file reads them)
    folder.py    a model folder on disk: config.json + model.safetensors + tokenizer/, sha256-verified
"""

# Names resolve on first use (PEP 562), so `gptcore.model.gptconfig` imports without torch.
_HOME = {**dict.fromkeys(("load_model", "model_sha256", "read_config", "save_model"), "gptcore.model.folder"),
         **dict.fromkeys(("GPT", "MLP", "MLPS", "NORMS", "PRESETS", "Block", "CausalSelfAttention", "GPTConfig", "KVCache",
                          "LayerNorm", "RMSNorm", "SwiGLU", "apply_rope", "build_model", "rope_tables", "sample"),
                         "gptcore.model.gpt")}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'gptcore.model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOME[name]), name)
