"""Other people's vocabulary files: OpenAI's GPT-2 `encoder.json` + `vocab.bpe`, and `.tiktoken` ranks.

GPT-2 stores each token's bytes as printable characters (`bytes_to_unicode`: byte 32 ' ' is 'Ġ'),
so a vocabulary can be a JSON object; `read_gpt2_files` maps them back to bytes and checks that
merge i really creates token 256 + i. A `.tiktoken` file is one line per token: base64 bytes, rank.
These functions only read and write the formats; `BPETokenizer` builds itself from what they return.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from gptcore.errors import CheckpointError
from gptcore.fileio import atomic_write_bytes
from gptcore.tokenizer.base import ENDOFTEXT

def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's table mapping each byte to a printable character, so BPE tokens can be JSON strings.

    Printable bytes map to themselves ("a" -> "a"); the other 68 (controls, space, ...) go to
    256, 257, ... in order, e.g. the space byte 32 -> "Ġ" (chr(288)), newline 10 -> "Ċ" (chr(266)).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table

def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: printable character -> byte."""
    return {c: b for b, c in bytes_to_unicode().items()}

def read_gpt2_files(encoder_json: str | Path, vocab_bpe: str | Path) -> tuple[list[tuple[int, int]], dict[str, int], list[int]]:
    """(merges, special tokens, byte order) from GPT-2's files (or HF's `vocab.json` + `merges.txt`).

    The merges are checked in the files' own printable form: `bytes_to_unicode` is one character per
    byte, so "Ġ" + "t" is token "Ġt" exactly when b" " + b"t" is b" t" (no bytes built per merge).
    """
    try:
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read GPT-2 vocabulary: {exc}", f"{encoder_json}, {vocab_bpe}",
                              "pass the encoder.json and vocab.bpe of a GPT-2 model") from None
    special = {s: i for s, i in encoder.items() if s == ENDOFTEXT}
    ids = {s: i for s, i in encoder.items() if s not in special}  # printable form -> id
    order = [0] * 256
    for b, c in bytes_to_unicode().items():
        i = ids.get(c)
        if i is None or i >= 256:
            raise CheckpointError(f"byte {b} is not one of tokens 0..255", str(encoder_json))
        order[i] = b
    merges = []
    for line in lines:
        if not line.strip() or line.startswith("#version"):
            continue
        x, y = line.split(" ")
        a, b = ids.get(x), ids.get(y)
        if a is None or b is None or ids.get(x + y) != 256 + len(merges):
            raise CheckpointError(f"merge {line!r} does not create token {256 + len(merges)}", str(vocab_bpe))
        merges.append((a, b))
    return merges, special, order

def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A `.tiktoken` rank file (lines "base64(token) rank") as `bytes -> rank`."""
    ranks: dict[bytes, int] = {}
    try:
        for line in Path(path).read_bytes().splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read tiktoken rank file: {exc}", str(path),
                              "pass a .tiktoken file (lines 'base64 rank')") from None
    if not ranks:
        raise CheckpointError("empty tiktoken rank file", str(path), "pass a .tiktoken file")
    return ranks

def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write the `.tiktoken` rank file (special tokens are not part of that format)."""
    lines = [base64.b64encode(b) + b" " + str(r).encode() for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write_bytes(path, b"\n".join(lines) + b"\n")
    return Path(path)
