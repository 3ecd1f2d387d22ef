"""What both tokenizer backends share: tiktoken's special-token rules and the tokenizer.json checks.

Every saved tokenizer is a folder holding `tokenizer.json`: a JSON object with `format`
("gptcore-bpe" | "gptcore-sentencepiece"), `version`, the backend's content, and `sha256` — the
hash of the canonical JSON of everything else. Reading verifies all three and names the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from gptcore.errors import CheckpointError
from gptcore.fileio import sha256_bytes

ENDOFTEXT = "<|endoftext|>"
FORMAT_BPE, FORMAT_SP, VERSION = "gptcore-bpe", "gptcore-sentencepiece", 1


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8: replace them the way tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class SpecialTokensMixin:
    """allowed_special handling shared by both tokenizers (tiktoken's semantics)."""

    special_tokens: dict[str, int]

    def _split_special(self, text: str, allowed_special) -> list[str | int]:
        """Text -> alternating ordinary strings and special ids.

        "none_raise": a special token's text anywhere raises ValueError; "none": it is ordinary
        text; "all" or a set: those specials become their ids (others still raise, as tiktoken)."""
        specials = self.special_tokens
        if allowed_special == "none":
            return [text]
        if allowed_special == "none_raise":
            allowed = set()
        elif allowed_special == "all":
            allowed = set(specials)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(specials)
            if unknown:
                raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        for s in specials:
            if s not in allowed and s in text:
                raise ValueError(
                    f"text contains the special token {s!r}: pass allowed_special='all' (or a set "
                    f"including it) to encode it as a special id, or 'none' to encode it as text")
        present = [s for s in allowed if s in text]
        if not present:
            return [text]
        alt = "|".join(re.escape(s) for s in sorted(present, key=len, reverse=True))
        out: list[str | int] = []
        pos = 0
        for m in re.finditer(alt, text):  # literal alternatives: the stdlib re, as tiktoken
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(specials[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def encode(self, text: str, allowed_special="none_raise") -> list[int]:
        """Text -> ids. `allowed_special`: "none_raise" (default), "none", "all" or a set of texts."""
        ids: list[int] = []
        for part in self._split_special(text, allowed_special):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self.encode_ordinary(part)
        return ids

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _dump(content: dict) -> bytes:
    return (json.dumps(content, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _content_sha(content: dict) -> str:
    canonical = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(canonical.encode("utf-8"))


def _dump_with_sha(content: dict, bulk: str) -> tuple[str, bytes]:
    """(`_content_sha(content)`, `_dump({**content, "sha256": it})`) with `content[bulk]`, a list of numbers
    or of number pairs (a vocabulary's merges: most of the file), JSON-encoded once for both texts.

    Both are compact JSON objects, so each is "{" + the `"key":value` items joined by "," + "}": the
    canonical text has the keys sorted (and nested objects sorted), the file keeps their order.
    """
    def value(d: dict, k: str, sort: bool) -> str:
        return encoded if k == bulk else json.dumps(d[k], ensure_ascii=False, sort_keys=sort, separators=(",", ":"))

    def text(d: dict, keys, sort: bool) -> str:
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + value(d, k, sort) for k in keys) + "}"

    encoded = json.dumps(content[bulk], separators=(",", ":"))
    sha = sha256_bytes(text(content, sorted(content), True).encode("utf-8"))
    full = {**content, "sha256": sha}
    return sha, (text(full, full, False) + "\n").encode("utf-8")


def _read_tokenizer_json(directory: str | Path, expected_format: str | None) -> tuple[Path, dict]:
    """Read and verify `directory/tokenizer.json`: JSON, format, version, sha256."""
    directory = Path(directory)
    path = directory / "tokenizer.json" if directory.is_dir() or not directory.suffix else directory
    fix = "retrain or re-save the tokenizer"
    try:
        content = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError("tokenizer file not found", str(path), "pass a folder written by tokenizer save/train") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"tokenizer file is not valid JSON ({exc.__class__.__name__})", str(path), fix) from None
    if not isinstance(content, dict):
        raise CheckpointError("tokenizer file is not a JSON object", str(path), fix)
    fmt = content.get("format")
    if fmt not in (FORMAT_BPE, FORMAT_SP) or (expected_format and fmt != expected_format):
        raise CheckpointError(f"unexpected tokenizer format {fmt!r}", str(path),
                              f"expected {expected_format or FORMAT_BPE + ' or ' + FORMAT_SP}")
    if content.get("version") != VERSION:
        raise CheckpointError(f"unsupported tokenizer version {content.get('version')!r}", str(path),
                              f"this gptcore reads version {VERSION}; {fix}")
    stored = content.pop("sha256", None)
    if stored != _content_sha(content):
        raise CheckpointError("tokenizer checksum mismatch (the file was modified or is corrupt)", str(path), fix)
    return path, content
