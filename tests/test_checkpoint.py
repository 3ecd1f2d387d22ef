"""Model folders: round trip, atomic writes, every damaged file a clear error; the CLI verbs."""

import json

import pytest
import torch

from gptcore.model.folder import load_model, model_sha256, save_model
from gptcore.errors import CheckpointError
from gptcore.model.gpt import GPTConfig, build_model

torch.set_num_threads(1)
TEXT = "def add(a, b):\n    return a + b  # the sum\n" * 30 + "Hello world, it's 2024! Ünïcödé 😀\n"


@pytest.fixture(scope="module")
def tok():
    from gptcore.tokenizer import BPETokenizer

    return BPETokenizer.train(TEXT, vocab_size=300, pattern="gpt2")


def make_model(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(GPTConfig(**{**dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32), **kw}))


@pytest.mark.parametrize("kw", [{}, dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=1, tie_embeddings=False)])
def test_round_trip(tmp_path, tok, kw):
    m = make_model(tok.vocab_size, **kw)
    out = save_model(m, tok, tmp_path / "ckpt")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "gptcore-model" and meta["config"] == m.config.to_dict()
    m2, tok2 = load_model(out)
    assert m2.config == m.config and tok2.sha256 == tok.sha256
    assert (m2.lm_head.weight is m2.transformer.wte.weight) == m.config.tie_embeddings
    idx = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(m2(idx)[0], m.eval()(idx)[0])
    assert not m2.training


def test_model_sha256_is_content_hash(tmp_path, tok):
    a = save_model(make_model(tok.vocab_size), tok, tmp_path / "a")
    b = save_model(make_model(tok.vocab_size), tok, tmp_path / "b")
    c = save_model(make_model(tok.vocab_size, seed=1), tok, tmp_path / "c")
    assert model_sha256(a) == model_sha256(b) != model_sha256(c)


def test_save_is_atomic(tmp_path, tok):
    good = save_model(make_model(tok.vocab_size), tok, tmp_path / "ckpt")
    before = model_sha256(good)

    class Broken:
        vocab_size = tok.vocab_size

        def save(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_model(make_model(tok.vocab_size, seed=5), Broken(), tmp_path / "ckpt")
    assert model_sha256(good) == before  # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left
    with pytest.raises(RuntimeError):
        save_model(make_model(tok.vocab_size), Broken(), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))


_DAMAGE = {  # how -> (the file it damages, what it does to it)
    "no_weights": ("model.safetensors", lambda f: f.unlink()),
    "truncated_weights": ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:-100])),
    "flipped_byte": ("model.safetensors", _flip_byte),
    "no_config": ("config.json", lambda f: f.unlink()),
    "truncated_config": ("config.json", lambda f: f.write_text(f.read_text()[:50])),
    "no_tokenizer": ("tokenizer/tokenizer.json", lambda f: f.unlink()),
    "truncated_tokenizer": ("tokenizer/tokenizer.json", lambda f: f.write_bytes(f.read_bytes()[:200])),
}


def _damage(folder, how):
    """Damage one file of a model folder; returns the name the error must mention."""
    rel, act = _DAMAGE[how]
    act(folder / rel)
    return rel.split("/")[-1]


@pytest.mark.parametrize("how", ["no_weights", "truncated_weights", "flipped_byte", "no_config", "truncated_config",
                                 "no_tokenizer", "truncated_tokenizer"])
def test_damaged_files_are_clear_errors(tmp_path, tok, how):
    out = save_model(make_model(tok.vocab_size), tok, tmp_path / "ckpt")
    name = _damage(out, how)
    with pytest.raises(CheckpointError) as exc:
        load_model(out)
    assert name in exc.value.message()


def test_tokenizer_vocab_mismatch(tmp_path, tok):
    with pytest.raises(CheckpointError, match="vocab_size"):
        save_model(make_model(tok.vocab_size + 4), tok, tmp_path / "x")
    # a folder whose tokenizer was swapped for another one
    from gptcore.tokenizer import BPETokenizer

    out = save_model(make_model(tok.vocab_size), tok, tmp_path / "ckpt")
    BPETokenizer.train(TEXT, vocab_size=280, pattern="gpt2").save(out / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer has 280 tokens") as exc:
        load_model(out)
    assert "tokenizer.json" in exc.value.message()
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")


# ------------------------------------------------------------------ CLI


def test_cli_generate_streams_and_is_seeded(tmp_path, tok, run_cli):
    out = save_model(make_model(tok.vocab_size), tok, tmp_path / "ckpt")
    args = ("generate", out, "--prompt", "def add(", "--max-new-tokens", "12", "--seed", "7")
    r1 = run_cli(*args)
    assert r1.returncode == 0, r1.stderr
    # the same continuation through the library: our model, the same generator seed
    m, t = load_model(out)
    ids = torch.tensor([t.encode("def add(")])
    new = m.generate(ids, 12, temperature=0.8, top_k=200, eos_id=t.eot_id, generator=torch.Generator().manual_seed(7))
    new = [i for i in new[0, ids.size(1):].tolist() if i != t.eot_id]
    assert r1.stdout == "def add(" + t.decode(new) + "\n"
    bad = run_cli("generate", tmp_path / "nope", "--prompt", "x")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_cli_convert_round_trip(tmp_path, tok, run_cli):
    import transformers

    m = make_model(tok.vocab_size)
    ckpt = save_model(m, tok, tmp_path / "ckpt")
    r = run_cli("convert", "to-hf", ckpt, tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "vocab.json").exists() and (tmp_path / "hf" / "merges.txt").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    r = run_cli("convert", "from-hf", tmp_path / "hf", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    back, back_tok = load_model(tmp_path / "back")
    assert back_tok.encode(TEXT[:200]) == tok.encode(TEXT[:200])
    idx = torch.randint(0, tok.vocab_size, (2, 30))
    with torch.no_grad():
        ref = hf(idx).logits
        assert (back(idx)[0] - ref).abs().max() <= 1e-4
        assert (m.eval()(idx)[0] - ref).abs().max() <= 1e-4
    r = run_cli("convert", "to-hf", tmp_path / "nope", tmp_path / "hf2")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_stream_text_never_splits_a_character(tok):
    """A character spread over several byte tokens is yielded once, whole."""
    from gptcore.model.generate import stream_text

    text = "héllo 😀 wörld"
    byte_id = {tok.decode_bytes([i]): i for i in range(256)}
    ids = [byte_id[bytes([b])] for b in text.encode("utf-8")]  # one token per byte
    assert tok.decode_bytes(ids) == text.encode("utf-8") and len(ids) > len(text)

    class Scripted(torch.nn.Module):  # a "model" that emits the given ids, then eot
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate_stream(self, idx, n, **kw):
            for i in ids + [tok.eot_id, 5, 6]:
                yield torch.tensor([[i]])

    pieces = list(stream_text(Scripted(), tok, "x", max_new_tokens=100, seed=0))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "😀" in pieces  # the 4-byte emoji arrives as one piece
