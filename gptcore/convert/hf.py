"""GPT-2 weights in and out: Hugging Face `GPT2LMHeadModel` folders <-> our `GPT`.

    model = load_hf_gpt2("path/to/gpt2")     # a save_pretrained folder, or "gpt2" when online
    save_hf_gpt2(model, "out/hf", tokenizer)  # GPT2LMHeadModel.from_pretrained("out/hf") loads it

Our module names are OpenAI's (nanoGPT kept them), so conversion is a rename of the prefix plus one
transpose: OpenAI's GPT-2 code (and transformers' `Conv1D`, which keeps its layout) stores the four
projection matrices attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj as (in, out) and computes
x @ W, while `nn.Linear` stores (out, in) and computes x @ W.T — so exactly those four weights are
transposed on the way in and on the way out. Everything else (embeddings, LayerNorms, biases) is
copied as is, and lm_head is wte (tied).

The tokenizer half: `tokenizer.json` (the `tokenizers` pipeline, for every split pattern:
gptcore/convert/hf_tokenizer.py) and, for GPT-2's own split, GPT-2's `vocab.json` / `merges.txt`;
both spell every token's bytes as printable unicode characters through OpenAI's byte<->unicode
table (`bytes_to_unicode`, gptcore/tokenizer/formats.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptcore.errors import CheckpointError, ConfigError
from gptcore.fileio import atomic_dir
from gptcore.model.gpt import GPT, GPTConfig
from gptcore.tokenizer.formats import bytes_to_unicode

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all GELU's tanh approximation


# ----------------------------------------------------------------------------- weights


def _hf_folder(path: str | Path) -> Path:
    """A local folder as is; anything else is treated as a hub id and downloaded (needs network)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/")):
        raise CheckpointError("not a Hugging Face model folder", str(path), "pass a save_pretrained folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # offline, unknown id, ...
        raise CheckpointError(f"cannot download {path!r} from the Hugging Face Hub: {exc.__class__.__name__}",
                              str(path), "check the id and the network, or pass a local folder") from None


def _read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").exists():  # sharded
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(folder / shard))
        return sd
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError("no weights found", str(folder), "expected model.safetensors or pytorch_model.bin")


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config dict; what our model cannot express is an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not gpt2", where, "only GPT-2 checkpoints convert")
    C = hf.get("n_embd", 768)
    unsupported = [
        (hf.get("activation_function", "gelu_new") not in TANH_GELUS, "activation_function", "tanh-approximate GELU"),
        (hf.get("n_inner") not in (None, 4 * C), "n_inner", f"None or {4 * C}"),
        (abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12, "layer_norm_epsilon", "1e-5"),
        (not hf.get("scale_attn_weights", True), "scale_attn_weights", "true"),
        (hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx", "false"),
        (hf.get("add_cross_attention", False), "add_cross_attention", "false"),
        (not hf.get("tie_word_embeddings", True), "tie_word_embeddings", "true"),
    ]
    for bad, key, want in unsupported:
        if bad:
            raise ConfigError(f"GPT-2 setting {key}={hf.get(key)!r} has no equivalent in our model", where,
                              f"only {key}={want} converts")
    return GPTConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=C, bias=True)


def load_hf_gpt2(path: str | Path, device="cpu") -> GPT:
    """Our GPT with the weights of a transformers GPT-2 (folder written by `save_pretrained`, or hub id)."""
    folder = _hf_folder(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError("missing config.json", str(cfg_file), "pass a save_pretrained folder")
    config = config_from_hf(json.loads(cfg_file.read_text()), str(cfg_file))
    hf_sd = _read_hf_state_dict(folder)

    sd = {}
    for k, v in hf_sd.items():
        k = k.removeprefix("transformer.")  # OpenAI's own files have no prefix
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old transformers versions; lm_head is wte (tied)
        v = v.float()
        sd["transformer." + k] = v.t().contiguous() if k.endswith(TRANSPOSED) else v

    with torch.device("meta"):
        model = GPT(config)
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise CheckpointError(f"weights do not match the config (missing {missing[:4]}, unexpected {extra[:4]})",
                              str(folder), "the folder must hold a GPT2LMHeadModel")
    for k, v in sd.items():
        want = model.get_parameter(k).shape
        if v.shape != want:
            raise CheckpointError(f"{k} has shape {tuple(v.shape)}, config wants {tuple(want)}", str(folder),
                                  "config.json and the weights disagree")
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    return model.to(device).eval()


def check_gpt2_compatible(config: GPTConfig) -> None:
    """Raise ConfigError if GPT2LMHeadModel cannot hold this architecture."""
    wrong = {k: getattr(config, k) for k, want in dict(norm="layernorm", mlp="gelu", pos="learned", qk_norm=False,
                                                       bias=True, tie_embeddings=True, logit_softcap=None).items()
             if getattr(config, k) != want}
    if config.n_kv_head != config.n_head:
        wrong["n_kv_head"] = config.n_kv_head
    if wrong:
        raise ConfigError(f"GPT-2 cannot express the variant {wrong}", "model",
                          "only layernorm + gelu + learned positions + bias + tied embeddings + n_kv_head = n_head "
                          "convert to Hugging Face GPT-2")


def save_hf_gpt2(model: GPT, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a folder that `AutoModelForCausalLM` / `GPT2LMHeadModel.from_pretrained` loads
    (config.json + model.safetensors + generation_config.json). With one of our BPE `tokenizer`s it
    also holds what `AutoTokenizer` loads: tokenizer.json (any split pattern: gptcore/convert/hf_tokenizer.py)
    and tokenizer_config.json, plus GPT-2's vocab.json/merges.txt when the split is GPT-2's. Atomic."""
    from safetensors.torch import save_file

    cfg = model.config
    check_gpt2_compatible(cfg)
    files: dict[str, str] = {}
    if tokenizer is not None:
        from gptcore.convert.hf_tokenizer import hf_tokenizer_files

        files = hf_tokenizer_files(tokenizer, cfg.block_size)
        if _is_gpt2_split(tokenizer):
            vocab, merges = gpt2_vocab_and_merges(tokenizer)
            files["vocab.json"] = json.dumps(vocab, ensure_ascii=False) + "\n"
            files["merges.txt"] = "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n"
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties on load
        v = v.detach().to("cpu", torch.float32)
        sd[k] = (v.t() if k.endswith(TRANSPOSED) else v).contiguous()
    eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    eot = 50256 if eot is None and tokenizer is None and cfg.vocab_size == 50257 else eot
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "dtype": "float32",
    }
    # generation: stop at <|endoftext|>, pad with it, never run past the learned positions
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "max_length": cfg.block_size}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir


def _is_gpt2_split(tokenizer) -> bool:
    from gptcore.tokenizer import PATTERNS

    return hasattr(tokenizer, "merges") and getattr(tokenizer, "pattern", None) == PATTERNS["gpt2"]


# ----------------------------------------------------------------------------- tokenizer files


def gpt2_vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2 `vocab.json` (token string -> id) and `merges.txt` pairs (in rank order) for one of our
    byte-level BPE tokenizers that splits text with GPT-2's pattern."""
    from gptcore.tokenizer import PATTERNS

    if not hasattr(tokenizer, "merges") or getattr(tokenizer, "pattern", None) != PATTERNS["gpt2"]:
        raise ConfigError("only a byte-level BPE tokenizer with GPT-2's split pattern has GPT-2 vocab files",
                          "tokenizer", "train it with backend bpe and pattern gpt2, or convert without a tokenizer")
    b2u = bytes_to_unicode()
    spell = lambda i: "".join(b2u[b] for b in tokenizer.decode_bytes([i]))  # noqa: E731  id -> "Ġthe"
    specials = dict(tokenizer.special_tokens)
    special_ids = set(specials.values())
    vocab = {spell(i): i for i in range(tokenizer.vocab_size) if i not in special_ids}
    vocab.update(specials)
    merges = [(spell(a), spell(b)) for a, b in tokenizer.merges]
    return vocab, merges


# ----------------------------------------------------------------------------- folder to folder (CLI)


def checkpoint_from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """A transformers GPT-2 folder -> one of our model folders. The tokenizer comes from the
    folder's tokenizer.json when present (any byte-level BPE, e.g. one `to-hf` wrote), else from
    vocab.json/merges.txt, else it is OpenAI's GPT-2 vocabulary."""
    from gptcore import tokenizer as tk
    from gptcore.convert.hf_tokenizer import from_hf_tokenizer_json
    from gptcore.model.folder import save_model

    folder = _hf_folder(hf_dir)
    model = load_hf_gpt2(folder)
    if (folder / "tokenizer.json").exists():
        tokenizer = from_hf_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        tokenizer = tk.BPETokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt")
    else:
        tokenizer = tk.gpt2_tokenizer()
    return save_model(model, tokenizer, out_dir)


def checkpoint_to_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """One of our model folders -> a transformers folder that AutoTokenizer and
    AutoModelForCausalLM load, the tokenizer included (a sentencepiece tokenizer is an error)."""
    from gptcore.model.folder import load_model

    model, tokenizer = load_model(checkpoint_dir)
    return save_hf_gpt2(model, out_dir, tokenizer)
