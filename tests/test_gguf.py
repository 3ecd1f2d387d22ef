"""GGUF export, read back with the gguf package's own reader and run in llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import pytest
import torch

from gptcore.errors import ConfigError
from gptcore.model.gpt import GPTConfig, build_model

gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)
TEXT = ("def add(a, b):\n    return a + b  # the sum\n\nclass Point:\n    x: int = 1040\n    y: int = 12345\n" * 12
        + "Hello world, it's 2024! DON'T we'll Ünïcödé naïve café 😀\n\n\t  x = [1, 2, 3]\n")


def trained(pattern: str = "gpt4", steps: int = 40):
    """A tokenizer and a briefly trained model, so greedy decoding has clear winners (no near-ties)."""
    from gptcore.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT * 2, vocab_size=420, pattern=pattern)
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor(tok.encode(TEXT * 3))
    data = torch.stack([ids[i : i + 65] for i in range(0, 8 * 40, 40)])  # (8, 65)
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from gptcore.model.folder import save_model

    model, tok = trained()
    folder = save_model(model, tok, tmp_path_factory.mktemp("m") / "final")
    return model, tok, folder


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_reads_back_with_gptcore_weights_and_tokenizer(exported, tmp_path, dtype, run_cli):
    import numpy as np

    from gptcore.convert.gguf_export import gguf_tensor_name
    from gptcore.convert.hf_tokenizer import _spell

    model, tok, folder = exported
    r = run_cli("convert", "to-gguf", folder, tmp_path / "m.gguf", "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "gpt2" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "llama-bpe"
    assert (field("gpt2.context_length"), field("gpt2.embedding_length"), field("gpt2.block_count"),
            field("gpt2.attention.head_count"), field("gpt2.feed_forward_length")) == (64, 32, 2, 2, 128)
    assert field("tokenizer.ggml.tokens") == _spell(tok)
    assert field("tokenizer.ggml.merges") == [f"{_spell(tok)[a]} {_spell(tok)[b]}" for a, b in tok.merges]
    assert field("tokenizer.ggml.eos_token_id") == tok.eot_id
    # the tensor names llama.cpp's gpt2 architecture declares (gguf's own table), nothing else
    want_names = {"token_embd.weight", "position_embd.weight", "output.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(2):
        for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]:
            n = gguf.TENSOR_NAMES[t]
            if "{bid}" in n:
                want_names |= {n.format(bid=i) + ".weight", n.format(bid=i) + ".bias"}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == want_names
    for k, v in model.state_dict().items():
        name = "output.weight" if k == "lm_head.weight" else gguf_tensor_name(k)
        got = np.asarray(tensors[name].data, dtype=np.float32).reshape(v.shape)
        assert np.allclose(got, v.detach().numpy(), atol=1e-3 if dtype == "f16" and v.ndim == 2 else 0), k
        assert tensors[name].tensor_type.name == ("F16" if dtype == "f16" and v.ndim == 2 else "F32")


def test_split_patterns_llama_cpp_has_and_has_not(tmp_path):
    from gptcore.convert.gguf_export import pre_tokenizer_name
    from gptcore.tokenizer import BPETokenizer

    assert pre_tokenizer_name(BPETokenizer.train(TEXT, 300, "gpt2")) == "gpt2"
    assert pre_tokenizer_name(BPETokenizer.train(TEXT, 300, "gpt4")) == "llama-bpe"
    with pytest.raises(ConfigError, match="hard-codes"):
        pre_tokenizer_name(BPETokenizer.train(TEXT, 300, r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"))


def test_to_gguf_errors_are_one_line(exported, tmp_path, run_cli):
    _, _, folder = exported
    r = run_cli("convert", "to-gguf", folder, tmp_path / "x.gguf", "--dtype", "q4")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown dtype 'q4'") and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


# ----------------------------------------------------------------------------- llama.cpp itself

PROMPTS = ["def add(a, b):\n", "class Point:\n    x", "Hello world, it's", "    y: int = 12"]


@pytest.fixture(scope="module")
def llama(exported, tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds from source, "
                                    "~15 min on 2 cores): pip install llama-cpp-python")
    from gptcore.convert.gguf_export import save_gguf

    model, tok, _ = exported
    path = save_gguf(model, tok, tmp_path_factory.mktemp("g") / "m.gguf")
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_batch=64, verbose=False)


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_us(exported, llama):
    from hypothesis import given, settings, strategies as st

    _, tok, _ = exported
    for text in [TEXT, *PROMPTS, "1040 12345678 \n\n\n  \t\r\n x", "'S 'll DON'T ÜNÏ 😀😀"]:
        assert llama.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_ordinary(text), text

    @settings(max_examples=300, deadline=None)
    @given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60))
    def same(text):
        assert llama.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_ordinary(text)

    same()


@pytest.mark.slow
def test_llama_cpp_greedy_continuation_equals_gptcore_generate(exported, llama, run_cli):
    model, tok, folder = exported
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        want = model.generate(torch.tensor([ids]), 24, temperature=0, eos_id=tok.eot_id)[0, len(ids):].tolist()
        llama.reset()
        got = []
        for t in llama.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t == tok.eot_id or len(got) == 24:
                break
            got.append(t)
        assert got == [t for t in want if t != tok.eot_id][: len(got)] and len(got) == min(24, len(want)), prompt
        r = run_cli("generate", folder, "-p", prompt, "-n", "24", "--temperature", "0")
        assert r.returncode == 0 and r.stdout == prompt + tok.decode(got) + "\n"
