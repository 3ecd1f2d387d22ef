"""SentencePieceTokenizer: Google's sentencepiece (BPE, byte fallback) behind our tokenizer interface.

Chosen by `tokenizer.backend: sentencepiece`, for comparison with our byte-level BPE
(gptcore/tokenizer.py); docs/01-tokenizer.md explains how the two differ.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from gptcore.tokenizer.train import iter_texts
from gptcore.errors import CheckpointError, ConfigError, DataError, GptcoreError
from gptcore.fileio import atomic_write_bytes, sha256_bytes
from gptcore.tokenizer.base import (ENDOFTEXT, FORMAT_SP, VERSION, SpecialTokensMixin, _content_sha, _dump,
                                    _read_tokenizer_json)


class SentencePieceTokenizer(SpecialTokensMixin):
    """sentencepiece BPE with byte fallback, behind the same interface as BPETokenizer.

    Differences from our byte-level BPE: no regex split (sentencepiece splits on whitespace,
    marking a space with U+2581 "▁" — so a literal "▁" in the input decodes as a space), pieces
    never contain a newline (newlines go to byte-fallback tokens), and the model is trained on lines.
    We turn off its normalization (identity rule, no whitespace folding, no dummy prefix) so it is
    as close to byte-exact as sentencepiece allows."""

    def __init__(self, model_proto: bytes, special_tokens: dict[str, int]):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.special_tokens = dict(special_tokens)
        self._by_id = {i: s for s, i in self.special_tokens.items()}

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int, pattern: str | None = None,
              special_tokens: Sequence[str] = (ENDOFTEXT,), progress: bool | None = None) -> "SentencePieceTokenizer":
        """Train sentencepiece BPE (`pattern` is ignored: sentencepiece has its own splitting)."""
        import sentencepiece as spm

        specials = list(dict.fromkeys(special_tokens))
        if vocab_size < 256 + 1 + len(specials):
            raise ConfigError(f"vocab_size {vocab_size} is below 256 bytes + <unk> + {len(specials)} special tokens",
                              "tokenizer.vocab_size", f"use at least {257 + len(specials)}")
        seen = {"lines": 0, "error": None}

        def lines():
            try:
                for text in iter_texts(texts):
                    for s in specials:
                        text = text.replace(s, "\n")
                    for line in text.split("\n"):
                        if line.strip():
                            seen["lines"] += 1
                            yield line[:8192]
            except GptcoreError as exc:  # raised again once sentencepiece returns
                seen["error"] = exc

        model = io.BytesIO()
        devnull = open(os.devnull, "w")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, control_symbols=specials, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False, character_coverage=0.9995,
                max_sentence_length=1 << 15, num_threads=1, minloglevel=2, logstream=devnull)
        except RuntimeError as exc:
            if seen["error"] is not None:
                raise seen["error"] from None
            if not seen["lines"]:
                raise DataError("no text to train the tokenizer on", "texts", "give at least one non-empty text") from None
            raise ConfigError(f"sentencepiece training failed: {exc}", "tokenizer.vocab_size",
                              "try a larger vocab_size or more text") from None
        finally:
            devnull.close()
        if seen["error"] is not None:
            raise seen["error"]
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        return cls(model.getvalue(), {s: sp.piece_to_id(s) for s in specials})

    def encode_ordinary(self, text: str) -> list[int]:
        return list(self._sp.encode(text)) if text else []

    def encode_batch(self, texts: Iterable[str], num_threads: int | None = None,
                     allowed_special="none_raise") -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._decode_str(ids).encode("utf-8", errors="replace")

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode_str(ids)

    def _decode_str(self, ids: Sequence[int]) -> str:
        n = self._sp.get_piece_size()
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"unknown token id {i} (vocab_size {n})")
            if i in self._by_id:
                out.append(self._sp.decode(run))
                out.append(self._by_id[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _content(self) -> dict:
        return {"format": FORMAT_SP, "version": VERSION, "model_file": "tokenizer.model",
                "model_sha256": sha256_bytes(self._proto), "special_tokens": self.special_tokens}

    @property
    def sha256(self) -> str:
        return _content_sha(self._content())

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.model` then `tokenizer.json` (which names and hashes it)."""
        directory = Path(directory)
        atomic_write_bytes(directory / "tokenizer.model", self._proto)
        content = self._content()
        content["sha256"] = self.sha256
        path = directory / "tokenizer.json"
        atomic_write_bytes(path, _dump(content))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "SentencePieceTokenizer":
        path, content = _read_tokenizer_json(directory, FORMAT_SP)
        model = Path(directory) / str(content.get("model_file", "tokenizer.model"))
        try:
            proto = model.read_bytes()
        except OSError:
            raise CheckpointError("sentencepiece model file is missing", str(model), "re-save the tokenizer") from None
        if sha256_bytes(proto) != content.get("model_sha256"):
            raise CheckpointError("sentencepiece model does not match its checksum", str(model),
                                  "the file is corrupt: retrain or re-save the tokenizer")
        return cls(proto, {str(k): int(v) for k, v in content["special_tokens"].items()})

    def to_tiktoken(self, name: str | None = None):
        raise GptcoreError("a sentencepiece tokenizer has no tiktoken equivalent", "tokenizer.backend",
                           "use the bpe backend to export to tiktoken")

    def save_tiktoken(self, path: str | Path):
        self.to_tiktoken()

    def __getstate__(self):
        return {"proto": self._proto, "special_tokens": self.special_tokens}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["special_tokens"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, specials={list(self.special_tokens)})"
