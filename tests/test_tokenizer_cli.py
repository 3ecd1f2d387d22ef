"""`gptcore tokenizer ...` through a real subprocess, bad input included; SentencePieceTokenizer;
load_tokenizer dispatch; train_tokenizer from a config section."""

import json

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gptcore.config import config_from_dict
from gptcore.errors import CheckpointError, ConfigError
from gptcore.tokenizer import BPETokenizer
from gptcore.tokenizer import SentencePieceTokenizer, load_tokenizer, train_tokenizer

CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + 'text {i}'\n\nclass C{i}:\n    pass\n" for i in range(200))


def _one_error_line(proc, *names):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


def test_cli_train_encode_decode_export(run_cli, tmp_path):
    src = tmp_path / "a.py"
    src.write_text(CORPUS)
    p = run_cli("tokenizer", "train", src, "--vocab-size", 300, "--out", tmp_path / "tok", "--pattern", "gpt2")
    assert p.returncode == 0, p.stderr
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.merges == BPETokenizer.train(CORPUS, 300, "gpt2").merges

    text = "def g(y):\n    return y <|endoftext|>"
    p = run_cli("tokenizer", "encode", tmp_path / "tok", text)
    assert p.returncode == 0, p.stderr
    ids = [int(x) for x in p.stdout.split()]
    assert ids == tok.encode(text, allowed_special="all") and ids[-1] == 299

    p = run_cli("tokenizer", "decode", tmp_path / "tok", *ids)
    assert p.returncode == 0 and p.stdout == text + "\n"

    p = run_cli("tokenizer", "export-tiktoken", tmp_path / "tok", tmp_path / "t.tiktoken")
    assert p.returncode == 0, p.stderr
    enc = tiktoken.Encoding("x", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(str(tmp_path / "t.tiktoken")),
                            special_tokens=tok.special_tokens)
    assert enc.encode(text, allowed_special="all") == ids


def test_cli_bad_input(run_cli, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(CORPUS)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème brûlée".encode("latin-1"))
    cases = [
        ([empty], "empty.txt"),
        ([good, binary], "blob.bin"),
        ([latin], "latin.txt"),
        ([tmp_path / "missing.txt"], "missing.txt"),
    ]
    for i, (files, name) in enumerate(cases):
        out = tmp_path / f"out{i}"
        p = run_cli("tokenizer", "train", *files, "--vocab-size", 300, "--out", out)
        _one_error_line(p, name)
        assert not out.exists()
    # an empty file among others (gptcore/*.py has an empty __init__.py) is skipped with one warning line
    p = run_cli("tokenizer", "train", empty, good, "--vocab-size", 300, "--out", tmp_path / "skip")
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines() == [f"warning: skipped 1 empty file(s): {empty}"]
    assert load_tokenizer(tmp_path / "skip").merges == BPETokenizer.train(CORPUS, 300).merges
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    p = run_cli("tokenizer", "train", empty, blank, "--vocab-size", 300, "--out", tmp_path / "none")
    _one_error_line(p, "every file is empty", "empty.txt")
    assert not (tmp_path / "none").exists()
    p = run_cli("tokenizer", "train", good, binary, "--vocab-size", 400, "--backend", "sentencepiece",
                "--out", tmp_path / "sp")
    _one_error_line(p, "blob.bin")
    assert not (tmp_path / "sp").exists()
    p = run_cli("tokenizer", "train", good, "--vocab-size", 257, "--special", "<a>", "--special", "<b>",
                "--out", tmp_path / "small")
    _one_error_line(p, "vocab_size", "257")
    assert not (tmp_path / "small").exists()
    p = run_cli("tokenizer", "train", good, "--vocab-size", 300, "--pattern", "(oops", "--out", tmp_path / "pat")
    _one_error_line(p, "pattern")
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []  # no temp dirs left behind

    assert run_cli("tokenizer", "train", good, "--vocab-size", 300, "--out", tmp_path / "tok").returncode == 0
    js = tmp_path / "tok" / "tokenizer.json"
    content = json.loads(js.read_text())
    content["merges"][5] = [1, 2]
    js.write_text(json.dumps(content))
    _one_error_line(run_cli("tokenizer", "encode", tmp_path / "tok", "hi"), "tokenizer.json", "checksum")
    js.write_text(js.read_text()[:100])
    _one_error_line(run_cli("tokenizer", "decode", tmp_path / "tok", 1, 2), "tokenizer.json")
    _one_error_line(run_cli("tokenizer", "encode", tmp_path / "nowhere", "hi"), "nowhere")


def test_cli_encode_decode_errors(run_cli, tmp_path):
    BPETokenizer.train(CORPUS, 300).save(tmp_path / "tok")
    _one_error_line(run_cli("tokenizer", "decode", tmp_path / "tok", 5000), "5000")
    _one_error_line(run_cli("tokenizer", "encode", tmp_path / "tok", "a<|endoftext|>", "--allowed-special",
                            "none_raise"), "<|endoftext|>")


def test_sentencepiece_tokenizer(tmp_path):
    sp = SentencePieceTokenizer.train([CORPUS], vocab_size=400)
    text = "def f7(x):\n    return x * 7  # ünïcode ☃ 中\n<|endoftext|>"
    ids = sp.encode(text, allowed_special="all")
    assert ids[-1] == sp.eot_id == sp.special_tokens["<|endoftext|>"]
    assert sp.decode(ids) == text  # byte fallback: unseen characters round-trip
    with pytest.raises(ValueError):
        sp.encode(text)
    assert sp.eot_id not in sp.encode(text, allowed_special="none")
    sp.save(tmp_path / "sp")
    assert sorted(q.name for q in (tmp_path / "sp").iterdir()) == ["tokenizer.json", "tokenizer.model"]
    back = load_tokenizer(tmp_path / "sp")
    assert isinstance(back, SentencePieceTokenizer) and back.encode(text, "all") == ids
    assert back.sha256 == sp.sha256
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path / "sp")
    import pickle

    assert pickle.loads(pickle.dumps(sp)).encode(text, "all") == ids


def test_sentencepiece_differs_from_byte_level():
    """Documented difference: U+2581 is sentencepiece's space marker, so it folds into a space."""
    sp = SentencePieceTokenizer.train([CORPUS], vocab_size=400)
    assert sp.decode(sp.encode("a\u2581b")) != "a\u2581b"
    bpe = BPETokenizer.train([CORPUS], vocab_size=300)
    assert bpe.decode(bpe.encode("a\u2581b")) == "a\u2581b"


def test_train_tokenizer_from_config_section():
    cfg = config_from_dict({"tokenizer": {"vocab_size": 300, "pattern": "gpt2", "special_tokens": ["<|endoftext|>", "<|pad|>"]}})
    tok = train_tokenizer(iter([CORPUS]), cfg.tokenizer)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    assert tok.merges == BPETokenizer.train(CORPUS, 300, "gpt2", ("<|endoftext|>", "<|pad|>")).merges
    cfg = config_from_dict({"tokenizer": {"vocab_size": 400, "backend": "sentencepiece"}})
    assert isinstance(train_tokenizer([CORPUS], cfg.tokenizer), SentencePieceTokenizer)
    cfg = config_from_dict({"tokenizer": {"vocab_size": 300, "train_bytes": 500}})
    small = train_tokenizer([CORPUS], cfg.tokenizer)
    assert small.merges == BPETokenizer.train(CORPUS.encode()[:500].decode(), 300).merges
    with pytest.raises(ConfigError):
        train_tokenizer([CORPUS], config_from_dict({"tokenizer": {"vocab_size": 257, "special_tokens": ["a", "b"]}}).tokenizer)
