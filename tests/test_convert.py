"""GPT-2 conversion against transformers itself: random GPT2LMHeadModels saved here, no downloads."""

import json

import pytest
import torch

from gptcore.convert.hf import bytes_to_unicode, gpt2_vocab_and_merges, load_hf_gpt2, save_hf_gpt2
from gptcore.errors import CheckpointError, ConfigError
from gptcore.model.gpt import GPTConfig, build_model

torch.set_num_threads(1)
import transformers  # noqa: E402  (dev extra: the reference implementation)


def random_hf(tmp_path, safe=True, **kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{**dict(vocab_size=311, n_positions=48, n_embd=64, n_layer=2, n_head=4), **kw})
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and norms non-trivial, so a missed mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / ("hf_safe" if safe else "hf_bin")
    hf.save_pretrained(out, safe_serialization=safe) if safe else torch.save(hf.state_dict(), _bin(out, hf))
    return hf, out


def _bin(out, hf):
    out.mkdir(parents=True)
    hf.config.to_json_file(out / "config.json")
    return out / "pytorch_model.bin"


@pytest.mark.parametrize("safe", [True, False])
def test_load_hf_gpt2_logits_match_transformers(tmp_path, safe):
    hf, folder = random_hf(tmp_path, safe)
    ours = load_hf_gpt2(folder)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    idx = torch.randint(0, 311, (3, 40))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generation_matches_transformers_generate(tmp_path):
    hf, folder = random_hf(tmp_path)
    ours = load_hf_gpt2(folder)
    idx = torch.randint(0, 311, (2, 6))
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx, 20, temperature=0), ref)


def test_save_hf_gpt2_round_trip_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = build_model(GPTConfig(vocab_size=257, block_size=40, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = save_hf_gpt2(ours, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        assert (hf(idx).logits - ours.eval()(idx)[0]).abs().max().item() <= 1e-4
    assert not list(tmp_path.glob(".hf.*"))  # no temp folder left behind


def test_unsupported_variants_are_clear_errors(tmp_path):
    for kw in (dict(norm="rmsnorm"), dict(pos="rope"), dict(n_kv_head=1), dict(mlp="swiglu"), dict(bias=False)):
        m = build_model(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, **kw))
        with pytest.raises(ConfigError, match="GPT-2 cannot express"):
            save_hf_gpt2(m, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    _, folder = random_hf(tmp_path, activation_function="relu")
    with pytest.raises(ConfigError, match="activation_function"):
        load_hf_gpt2(folder)
    with pytest.raises(CheckpointError):
        load_hf_gpt2(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):  # tests run offline (HF_HUB_OFFLINE=1)
        load_hf_gpt2("openai-community/gpt2-not-cached")


def test_bytes_to_unicode_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_gpt2_vocab_files_equal_openai_files(gpt2_files):
    """Our export of OpenAI's vocabulary reproduces encoder.json and vocab.bpe exactly."""
    from gptcore.tokenizer import BPETokenizer

    encoder_json, vocab_bpe = gpt2_files
    tok = BPETokenizer.from_gpt2_files(encoder_json, vocab_bpe)
    vocab, merges = gpt2_vocab_and_merges(tok)
    assert vocab == json.loads(encoder_json.read_text(encoding="utf-8"))
    lines = [ln for ln in vocab_bpe.read_text(encoding="utf-8").split("\n")[1:] if ln.strip()]
    assert [f"{a} {b}" for a, b in merges] == lines


def test_save_with_tokenizer_loads_in_transformers_tokenizer(tmp_path):
    """A GPT-2-pattern tokenizer we trained, exported, tokenizes like ours in transformers' GPT2Tokenizer."""
    from gptcore.tokenizer import BPETokenizer

    text = "def add(a, b):\n    return a + b  # sum\n" * 20 + "Hello world, it's 2024! Ünïcödé 😀"
    tok = BPETokenizer.train(text, vocab_size=300, pattern="gpt2")
    m = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = save_hf_gpt2(m, tmp_path / "hf", tokenizer=tok)
    hf_tok = transformers.GPT2Tokenizer.from_pretrained(out)
    for s in ["def add(x, y):\n    return x + y", "Hello it's 😀 Ünï", "  spaces\n\nand\ttabs"]:
        assert hf_tok.encode(s) == tok.encode(s)
    gpt4 = BPETokenizer.train(text, vocab_size=300, pattern="gpt4")
    with pytest.raises(ConfigError, match="split pattern"):
        save_hf_gpt2(m, tmp_path / "hf2", tokenizer=gpt4)
