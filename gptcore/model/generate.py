"""Text in, text out: encode a prompt, stream the model's continuation as decoded text.

    model, tok = load_model("runs/tiny/final")
    for piece in stream_text(model, tok, "def main(", max_new_tokens=50, seed=0):
        print(piece, end="", flush=True)

Tokens are decoded with an incremental UTF-8 decoder, so a character split across two tokens is
printed once both have arrived (never as a replacement character in the middle of a stream).
`repetition_penalty=1.3, no_repeat_ngram_size=3` keep a small model out of loops (off by default:
the plain distribution, exactly).
"""

from __future__ import annotations

import codecs
from typing import Iterator

import torch

from gptcore.errors import ConfigError


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                top_k: int | None = 200, top_p: float | None = None, seed: int | None = None,
                stop_at_eot: bool = True, **penalties) -> Iterator[str]:
    """Yield the decoded continuation of `prompt` piece by piece (one sampled token at a time).
    `penalties`: repetition_penalty, no_repeat_ngram_size (GPT.generate_stream; off by default)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, **penalties)
    ids = tokenizer.encode(prompt, allowed_special="all") if prompt else []
    if not ids:  # an empty prompt starts from the end-of-text token (a fresh document)
        if tokenizer.eot_id is None:
            raise ConfigError("empty prompt and the tokenizer has no <|endoftext|>", "--prompt", "give a prompt")
        ids = [tokenizer.eot_id]
    yield from stream_ids(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eot, **penalties)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> None:
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k <= 0) \
            or (top_p is not None and not 0 < top_p <= 1) or not repetition_penalty > 0 or no_repeat_ngram_size < 0:
        raise ConfigError("invalid sampling settings", "generate",
                          "use max_new_tokens >= 0, temperature >= 0, top_k > 0, 0 < top_p <= 1, "
                          "repetition_penalty > 0 (1 = off), no_repeat_ngram_size >= 0 (0 = off)")


def stream_ids(model, tokenizer, ids: list[int], max_new_tokens: int = 100, temperature: float = 0.8,
               top_k: int | None = 200, top_p: float | None = None, seed: int | None = None,
               stop_at_eot: bool = True, stats: dict | None = None, **penalties) -> Iterator[str]:
    """Yield the decoded continuation of the token ids `ids`. `stats`, when given, receives
    "tokens" (how many were generated) and "eot" (whether <|endoftext|> ended it)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    eos = tokenizer.eot_id if stop_at_eot else None
    stats = {} if stats is None else stats
    stats.update(tokens=0, eot=False)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tok in model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     eos_id=eos, generator=generator, **penalties):
        t = int(tok[0, 0])
        stats["tokens"] += 1
        if t == eos:
            stats["eot"] = True
            break
        piece = decoder.decode(tokenizer.decode_bytes([t]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
