"""A model checkpoint is a self-contained folder, written atomically and verified on load:

    config.json              {"format": "gptcore-model", "version": 1, "config": GPTConfig, "model_sha256": ...}
    model.safetensors        the weights (a tied lm_head is stored once, as transformer.wte.weight)
    tokenizer/tokenizer.json the tokenizer that produced the model's token ids

`load_model` rebuilds the model on the meta device and assigns the stored tensors, so weights are
allocated once. A missing, truncated or corrupt file, or a tokenizer whose vocabulary does not
match the model, raises `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptcore.errors import CheckpointError, GptcoreError
from gptcore.fileio import atomic_dir, sha256_bytes, sha256_file
from gptcore.model.gpt import GPT, GPTConfig

FORMAT, VERSION = "gptcore-model", 1


def _weights(model: GPT) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the same parameters
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_model(model: GPT, tokenizer, directory: str | Path) -> Path:
    """Write model + tokenizer to `directory` (replaced atomically: temp folder, then rename)."""
    from safetensors.torch import save_file

    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens, model vocab_size is "
                              f"{model.config.vocab_size}", str(directory), "save the tokenizer the model was built for")
    directory = Path(directory)
    model = getattr(model, "_orig_mod", model)
    with atomic_dir(directory) as tmp:
        save_file(_weights(model), tmp / "model.safetensors", metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
                "model_sha256": sha256_file(tmp / "model.safetensors")}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
    return directory


def read_config(directory: str | Path) -> dict:
    """The verified contents of `directory/config.json` (format, version, config, model_sha256)."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError("checkpoint folder not found", str(directory), "pass a folder written by save_model")
    if not path.exists():
        raise CheckpointError("missing config.json", str(path), "the checkpoint is incomplete; save it again")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"config.json is not valid JSON ({exc.__class__.__name__})", str(path),
                              "the file is truncated or corrupt; save the checkpoint again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"not a {FORMAT} v{VERSION} config", str(path),
                              "for Hugging Face folders use `gptcore convert from-hf`")
    if "config" not in meta or "model_sha256" not in meta:
        raise CheckpointError("config.json lacks config/model_sha256", str(path), "save the checkpoint again")
    return meta


def model_sha256(directory: str | Path) -> str:
    """Content hash of a model folder's architecture and weights (not of the tokenizer or file paths)."""
    meta = read_config(directory)
    weights = Path(directory) / "model.safetensors"
    if not weights.exists():
        raise CheckpointError("missing model.safetensors", str(weights), "the checkpoint is incomplete; save it again")
    blob = json.dumps(meta["config"], sort_keys=True) + "\n" + sha256_file(weights)
    return sha256_bytes(blob.encode())


def load_model(directory: str | Path, device="cpu", load_tokenizer: bool = True):
    """(model, tokenizer) from a folder written by `save_model`, every file verified.

    The model is returned in eval mode on `device`; tokenizer is None when load_tokenizer=False.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_config(directory)
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (GptcoreError, TypeError) as exc:
        raise CheckpointError(f"invalid model config: {exc}", str(directory / "config.json"),
                              "save the checkpoint again") from None
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise CheckpointError("missing model.safetensors", str(weights), "the checkpoint is incomplete; save it again")
    if sha256_file(weights) != meta["model_sha256"]:
        raise CheckpointError("model.safetensors does not match the sha256 in config.json", str(weights),
                              "the file is truncated or corrupt; restore or save the checkpoint again")
    try:
        sd = load_file(weights, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights: {exc}", str(weights), "save the checkpoint again") from None

    with torch.device("meta"):
        model = GPT(config)
    expected = set(_weights(model))
    if set(sd) != expected:
        raise CheckpointError(f"weights do not match config.json (missing {sorted(expected - set(sd))[:4]}, "
                              f"unexpected {sorted(set(sd) - expected)[:4]})", str(weights), "save the checkpoint again")
    try:
        model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit the config: {exc}", str(weights), "save the checkpoint again") from None
    model.tie_weights()
    model.eval()

    tokenizer = None
    if load_tokenizer:
        tok_file = directory / "tokenizer" / "tokenizer.json"
        if not tok_file.exists():
            raise CheckpointError("missing tokenizer", str(tok_file), "save the checkpoint with its tokenizer")
        from gptcore.tokenizer import load_tokenizer as _load_tokenizer

        try:
            tokenizer = _load_tokenizer(directory / "tokenizer")
        except GptcoreError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tokenizer: {exc.__class__.__name__}: {exc}", str(tok_file),
                                  "the file is truncated or corrupt; save the checkpoint again") from None
        if tokenizer.vocab_size != config.vocab_size:
            raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens, model vocab_size is {config.vocab_size}",
                                  str(tok_file), "put the tokenizer the model was trained with in the checkpoint")
    return model, tokenizer
