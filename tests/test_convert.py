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
    assert torch.equal(ours.generate(idx, 20, temperature=0), ref)  # prefill, then static decode steps
    assert torch.equal(ours.generate(idx, 20, temperature=0, use_cache=False), ref)  # no cache: full recompute


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
    """A GPT-2-pattern tokenizer we trained, exported, tokenizes like ours in transformers' GPT2Tokenizer
    (vocab.json + merges.txt) and in AutoTokenizer (tokenizer.json)."""
    from gptcore.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT, vocab_size=300, pattern="gpt2")
    m = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = save_hf_gpt2(m, tmp_path / "hf", tokenizer=tok)
    slow, fast = transformers.GPT2Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
    for s in ["def add(x, y):\n    return x + y", "Hello it's 😀 Ünï", "  spaces\n\nand\ttabs"]:
        assert slow.encode(s) == tok.encode(s) == fast.encode(s)


# ----------------------------------------------------------------------------- tokenizer.json, any split

TEXT = "def add(a, b):\n    return a + b  # sum\n" * 20 + "Hello world, it's 2024! 1040 12345 Ünïcödé 😀\n\n\t x"
CUSTOM = r"""\p{L}+|\p{N}{1,2}+|[^\p{L}\p{N}]"""  # a regex of our own, with a possessive interval


@pytest.fixture(scope="module", params=["gpt2", "gpt4", CUSTOM])
def exported(request, tmp_path_factory):
    """(our tokenizer, AutoTokenizer of its export) for each kind of split pattern we train."""
    from gptcore.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT * 3, vocab_size=400, pattern=request.param)
    m = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16))
    out = save_hf_gpt2(m, tmp_path_factory.mktemp("hf") / "hf", tokenizer=tok)
    return tok, transformers.AutoTokenizer.from_pretrained(out), out


def test_possessive_interval_is_rewritten_for_oniguruma():
    from tokenizers import Regex, pre_tokenizers

    from gptcore.convert.hf_tokenizer import hf_split_pattern
    from gptcore.tokenizer import PATTERNS

    split = lambda pat, s: [x for x, _ in pre_tokenizers.Split(Regex(pat), "isolated").pre_tokenize_str(s)]  # noqa: E731
    assert split(r"\p{N}{1,3}+", "1040") == ["1040"]  # the trap: Oniguruma repeats the group
    assert split(hf_split_pattern(r"\p{N}{1,3}+"), "1040") == ["104", "0"]  # as regex/tiktoken split it
    assert hf_split_pattern(PATTERNS["gpt2"]) == PATTERNS["gpt2"]  # nothing to rewrite
    assert hf_split_pattern(r"[a{]{2}+(x){1,}+\p{L}{3}") == r"(?>[a{]{2})(?>(x){1,})\p{L}{3}"


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80) | st.lists(
    st.sampled_from(list("ab1 \n\t'sSLl0é😀,.<|>") + ["<|endoftext|>", "1040", "  ", "\r\n", "'ll", "'S"]), max_size=40
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ANY_TEXT)
def test_auto_tokenizer_ids_equal_ours(exported, text):
    tok, hf, _ = exported
    ids = tok.encode(text, allowed_special="all")
    assert hf.encode(text) == ids
    assert hf.decode(ids) == tok.decode(ids)


def test_tokenizer_files_and_config_ids(exported):
    tok, hf, out = exported
    cfg, tcfg = (json.loads((out / n).read_text()) for n in ("config.json", "tokenizer_config.json"))
    gen = json.loads((out / "generation_config.json").read_text())
    eot = tok.eot_id
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == gen["eos_token_id"] == gen["pad_token_id"] == eot is not None
    assert hf.eos_token_id == hf.bos_token_id == hf.pad_token_id == eot and hf.eos_token == "<|endoftext|>"
    assert tcfg["model_max_length"] == hf.model_max_length == 24 == gen["max_length"]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == eot
    assert len(hf) == tok.vocab_size


def test_from_hf_reads_the_tokenizer_back(exported, tmp_path):
    from gptcore.convert.hf import checkpoint_from_hf
    from gptcore.model.folder import load_model

    tok, _, out = exported
    _, back = load_model(checkpoint_from_hf(out, tmp_path / "ours"))
    assert back.sha256 == tok.sha256  # same merges, byte order, specials and split pattern


def test_patterns_hf_cannot_reproduce_are_clear_errors(tmp_path):
    from gptcore.tokenizer import BPETokenizer

    m = build_model(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=16))
    for pattern, why in [(r"\p{L}+| ?\p{N}+", "splits this pattern differently"),  # ours drops what nothing matches
                         (r"(?V1)\p{L}+|[^\p{L}]", "cannot compile")]:
        tok = BPETokenizer.train(TEXT, vocab_size=300, pattern=pattern, special_tokens=["<|endoftext|>"])
        m = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
        with pytest.raises(ConfigError, match=why):
            save_hf_gpt2(m, tmp_path / "x", tokenizer=tok)
        assert not (tmp_path / "x").exists()


def test_trained_gpt4_model_in_transformers_generates_like_ours(tmp_path, run_cli):
    """The Done-when check on a trained folder: `gptcore convert to-hf`, then AutoTokenizer +
    AutoModelForCausalLM (and `pipeline`) give our greedy continuation token for token."""
    from gptcore.model.folder import load_model, save_model
    from gptcore.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT * 3, vocab_size=400, pattern="gpt4")
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(tok.encode(TEXT * 3)[: 8 * 65]).view(8, 65)
    for _ in range(30):  # a little training, so the continuation is text, not noise
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model.eval(), tok, tmp_path / "ours")
    r = run_cli("convert", "to-hf", tmp_path / "ours", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    ours, tok = load_model(tmp_path / "ours")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = "def add(a, b):\n"
    ids = hf_tok(prompt, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == tok.encode(prompt)
    want = hf.generate(**ids, max_new_tokens=20, do_sample=False)
    got = ours.generate(ids["input_ids"], 20, temperature=0, eos_id=tok.eot_id)
    assert got.tolist() == want.tolist()
    text = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))(prompt, max_new_tokens=20,
                                                                               do_sample=False)[0]["generated_text"]
    assert text == tok.decode([t for t in got[0].tolist() if t != tok.eot_id])
