"""Our model folders as GGUF files for llama.cpp and Ollama (`gptcore convert to-gguf MODEL OUT.gguf`).

GGUF is one file: key/value metadata, then named tensors. The `gguf` package (llama.cpp's own
writer) writes it; this module decides what goes in, the way llama.cpp's convert_hf_to_gguf.py
does for GPT-2:

    metadata   general.architecture = "gpt2", gpt2.context_length / embedding_length /
               feed_forward_length / block_count / attention.head_count / layer_norm_epsilon
    tokenizer  tokenizer.ggml.model = "gpt2" (byte-level BPE): every token spelled through GPT-2's
               byte<->unicode table, the merges in rank order, <|endoftext|> as bos/eos (CONTROL),
               and tokenizer.ggml.pre naming the split regex llama.cpp applies before BPE:
                   our "gpt2" split  -> "gpt2"
                   our "gpt4" split  -> "llama-bpe" (Llama 3's regex, which splits like cl100k)
               llama.cpp hard-codes its split regexes per name, so any other pattern is an error.
    tensors    token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm,
               ffn_up, ffn_down}, output_norm, output (= token_embd: GPT-2 ties them).
               Our nn.Linear weights are (out, in), the layout GGUF expects: no transposes here
               (unlike Hugging Face's Conv1D, which convert_hf_to_gguf transposes back).

`--dtype f16` stores the matrices as float16 and keeps norms and biases in float32, as llama.cpp does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gptcore.errors import ConfigError, GptcoreError

PRE_TOKENIZERS = {"gpt2": "gpt2", "gpt4": "llama-bpe"}  # our pattern name -> llama.cpp's tokenizer.ggml.pre
BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gguf_tensor_name(name: str) -> str:
    """Our state-dict name -> llama.cpp's GPT-2 tensor name.

        >>> gguf_tensor_name("transformer.h.3.attn.c_attn.bias")
        'blk.3.attn_qkv.bias'
    """
    name = name.removeprefix("transformer.")
    top = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
           "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)  # h.3.attn.c_attn.bias
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{BLOCK[module]}.{kind}"


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for our split pattern; a pattern it does not hard-code is a ConfigError."""
    from gptcore.tokenizer import PATTERNS

    for ours, theirs in PRE_TOKENIZERS.items():
        if getattr(tokenizer, "pattern", None) == PATTERNS[ours]:
            return theirs
    raise ConfigError("llama.cpp splits text only with the regexes it hard-codes (gpt2, llama-bpe, ...), not this "
                      "tokenizer's own pattern", "tokenizer.pattern",
                      "train the tokenizer with pattern gpt2 or gpt4 to run the model in llama.cpp")


def save_gguf(model, tokenizer, path: str | Path, dtype: str = "f32", name: str = "gptcore") -> Path:
    """Write `model` + `tokenizer` as one GGUF file at `path` (atomically)."""
    try:
        import gguf
    except ImportError:
        raise GptcoreError("the GGUF writer needs the gguf package", "to-gguf", "pip install gguf") from None
    from gptcore.convert.hf import check_gpt2_compatible
    from gptcore.convert.hf_tokenizer import _spell
    from gptcore.fileio import make_readable

    if dtype not in ("f32", "f16"):
        raise ConfigError(f"unknown dtype {dtype!r}", "--dtype", "use f32 or f16")
    cfg = model.config
    check_gpt2_compatible(cfg)
    if not hasattr(tokenizer, "merges"):
        raise ConfigError("only our byte-level BPE tokenizers convert to GGUF", "tokenizer", "train with backend: bpe")
    pre = pre_tokenizer_name(tokenizer)
    if tokenizer.eot_id is None:
        raise ConfigError("the tokenizer has no <|endoftext|> token", "tokenizer", "llama.cpp needs it as bos/eos")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), arch="gpt2")
        w.add_name(name)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(1e-5)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)

        spelled = _spell(tokenizer)
        specials = set(tokenizer.special_tokens.values())
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(spelled)
        w.add_token_types([int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
                           for i in range(len(spelled))])
        w.add_token_merges([f"{spelled[a]} {spelled[b]}" for a, b in tokenizer.merges])
        w.add_bos_token_id(tokenizer.eot_id)
        w.add_eos_token_id(tokenizer.eot_id)
        w.add_add_bos_token(False)  # GPT-2 never prepends one; our prompts are the text's own tokens

        for k, v in model.state_dict().items():
            if k == "lm_head.weight":
                continue
            a = v.detach().to("cpu").float().numpy()
            a = a.astype(np.float16) if dtype == "f16" and a.ndim == 2 else a  # (out, in) as is
            w.add_tensor(gguf_tensor_name(k), a)
            if k == "transformer.wte.weight":
                w.add_tensor("output.weight", a)  # tied: llama.cpp's gpt2 reads the head as its own tensor
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def checkpoint_to_gguf(checkpoint_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """One of our model folders -> OUT.gguf."""
    from gptcore.model.folder import load_model

    model, tokenizer = load_model(checkpoint_dir)
    return save_gguf(model, tokenizer, out, dtype, name=Path(checkpoint_dir).name)
