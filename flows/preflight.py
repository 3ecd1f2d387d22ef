"""What `gptcore run` and `gptcore sweep` check before any work starts, so a mistake or a broken
environment costs seconds and one line, not a half-run pipeline:

    the config        gptcore.config.check_config, then the model shape against the vocabulary of
                      a `tokenizer.path` that exists already, or that a `--base` folder is a model
    the tracking store tasks/tracking_store.py: the folder exists and is writable, or the server answers

What needs a stage's output (a trained tokenizer's vocabulary) is checked before the first
expensive step instead: pretrain refuses a model.vocab_size below the tokenizer's before building
a model. This module imports nothing heavy (no Prefect, MLflow or torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from gptcore.config import Config, check_config
from gptcore.errors import CheckpointError, ConfigError


def check_environment(cfg: Config, base: str | Path | None = None) -> None:
    """Raise the one-line error of the first thing that would make this pipeline fail later."""
    from tasks.tracking_store import check_tracking_store, tracking_uri

    check_config(cfg)
    if base is not None:
        _check_base(Path(base))
    elif cfg.tokenizer.path and cfg.tokenizer.path != "gpt2":
        _check_vocab(cfg, _tokenizer_vocab(cfg.tokenizer.path))
    if cfg.tracking.enabled:
        check_tracking_store(tracking_uri(cfg))


def _tokenizer_vocab(path: str) -> int:
    from gptcore.tokenizer import load_tokenizer  # verifies the file (format, version, sha256)

    return load_tokenizer(path).vocab_size


def _check_vocab(cfg: Config, vocab: int) -> None:
    from gptcore.model.gptconfig import GPTConfig

    over = cfg.model.overrides()
    if over.get("vocab_size", vocab) < vocab:
        raise ConfigError(f"model.vocab_size {over['vocab_size']} is below the tokenizer's {vocab}", "model.vocab_size",
                          "remove it (the tokenizer's size is used) or raise it")
    GPTConfig.preset(cfg.model.preset, **{**over, "vocab_size": over.get("vocab_size", vocab)})


def _check_base(base: Path) -> None:
    """A `--base` folder is a gptcore model folder (its weights are verified when fine-tuning loads them)."""
    meta_file = base / "config.json"
    fix = "pass a folder written by pretrain or `gptcore convert from-hf`"
    try:
        meta = json.loads(meta_file.read_text())
        int(meta["config"]["block_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError("not a gptcore model folder (no readable config.json)", str(meta_file), fix) from None
    if not (base / "model.safetensors").is_file():
        raise CheckpointError("the base model has no weights", str(base / "model.safetensors"), fix)
