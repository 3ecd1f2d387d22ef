"""BPETokenizer against tiktoken (GPT-2 and cl100k), special-token semantics, save/load, pickling,
tiktoken export. The references are OpenAI's own definitions (tiktoken_ext.openai_public), fed the
real rank files from disk, never our own output."""

import pickle
import subprocess
import sys

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
from tiktoken_ext import openai_public

from gptcore.errors import CheckpointError
from gptcore.tokenizer import BPETokenizer, gpt2_tokenizer, load_tokenizer

HARD_CASES = [
    "",
    "hello world",
    "Hello, World! How's it going? I'm fine, we'll see, they've, you're, she'd",
    "HOW'S IT GOING? I'M FINE, WE'LL SEE",
    " " * 1 + "x", " " * 7 + "x", " " * 40, "a" + " " * 33 + "b", "\t\t\tx\t \t", "x  \n  \n\n\n  y",
    "\n" * 17, "line1\r\nline2\r\n\r\n", "\r\r\n\n\r", "trailing spaces   ", "   ",
    "1234567890 12 123 1234 3.14159 -42 1e10 0x7fff 1,000,000",
    "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️", "🇫🇷🇯🇵",
    "中文字符测试，你好世界。日本語のテキスト、한국어 텍스트",
    "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 combining ̈̈̈ marks",
    "Ünïcödé çà et là — “quotes” ‘single’ … «guillemets»",
    "\u200b\u200d\ufeff zero-width \u00a0nbsp\u2009thin \u3000ideographic",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A(B):\n\tpass\n",
    "<|endoftext|> is only special when allowed",
    "!!!???...,,,;;;::: @@@ ### $$$ %%% ^^^ &&& *** ((())) [[]] {{}}",
    "\x00\x01\x02\x7f control \x1b[31mred\x1b[0m",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 \U0010fffd \ufffd",
    "ﬁ ﬂ Ⅻ ① ²³ ½",
    "'s 's 'S 'll 'LL 've 're 'd 'm 't 'T",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 3,
]


@pytest.fixture(scope="module")
def gpt2_pair(gpt2_files):
    encoder_json, vocab_bpe = gpt2_files
    ours = BPETokenizer.from_gpt2_files(encoder_json, vocab_bpe)
    # OpenAI's own GPT-2 definition, with the two files read from disk instead of the network
    orig = openai_public.data_gym_to_mergeable_bpe_ranks
    openai_public.data_gym_to_mergeable_bpe_ranks = lambda **k: data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    try:
        spec = openai_public.gpt2()
    finally:
        openai_public.data_gym_to_mergeable_bpe_ranks = orig
    ref = tiktoken.Encoding(**spec)
    return ours, ref


@pytest.fixture(scope="module")
def cl100k_pair(cl100k_file):
    # OpenAI's own cl100k definition, with the rank file read from disk instead of the network
    orig = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda *a, **k: load_tiktoken_bpe(str(cl100k_file))
    try:
        spec = openai_public.cl100k_base()
    finally:
        openai_public.load_tiktoken_bpe = orig
    ref = tiktoken.Encoding(**spec)
    ours = BPETokenizer.from_tiktoken_file(cl100k_file, "gpt4", spec["special_tokens"])
    return ours, ref


def test_gpt2_vocab_matches_openai(gpt2_pair):
    ours, ref = gpt2_pair
    assert ours.vocab_size == ref.n_vocab == 50257
    assert ours.eot_id == ref.eot_token == 50256
    assert ours._ranks == ref._mergeable_ranks


@pytest.mark.parametrize("text", HARD_CASES)
@pytest.mark.parametrize("encoding", ["gpt2_pair", "cl100k_pair"])
def test_hard_cases_equal_tiktoken(request, encoding, text):
    ours, ref = request.getfixturevalue(encoding)
    ids = ours.encode(text, allowed_special="none")
    assert ids == ref.encode(text, disallowed_special=())
    assert ours.decode(ids) == text
    assert ours.decode_bytes(ids) == ref.decode_bytes(ids)


def test_long_runs_and_big_text(gpt2_pair, cl100k_pair):
    text = ("x" + " " * 500 + "\n" * 300 + "\t" * 200 + "ab" * 400 + "9" * 301 + "😀" * 50 + "\r\n" * 64) * 3
    for ours, ref in (gpt2_pair, cl100k_pair):
        assert ours.encode_ordinary(text) == ref.encode_ordinary(text)


def test_lone_surrogates_like_tiktoken(gpt2_pair):
    ours, ref = gpt2_pair
    text = "a\ud800b \udfff c\ud83d\ude00"
    assert ours.encode(text) == ref.encode(text)


_interesting = st.sampled_from(list(" \t\n\r\x0b\x0c'sdmtlvreSDMTLVRE0123456789.,!?-_()[]{}<>|/\\\"#@$%^&*+=~`")
                               + ["\u0301", "\u200d", "\ufe0f", "😀", "🏽", "中", "é", "ß", "\u00a0", "\u3000", "<|endoftext|>"])
_texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(_interesting, st.text(max_size=3)), max_size=40).map("".join),
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts)
def test_fuzz_gpt2_equals_tiktoken(gpt2_pair, text):
    ours, ref = gpt2_pair
    assert ours.encode(text, allowed_special="none") == ref.encode(text, disallowed_special=())


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts)
def test_fuzz_cl100k_equals_tiktoken(cl100k_pair, text):
    ours, ref = cl100k_pair
    ids = ours.encode(text, allowed_special="all")
    assert ids == ref.encode(text, allowed_special="all")
    assert ours.decode(ids) == ref.decode(ids)


def test_allowed_special_semantics(gpt2_pair, cl100k_pair):
    text = "a<|endoftext|>b<|fim_prefix|>"
    ours, ref = gpt2_pair
    with pytest.raises(ValueError):
        ref.encode(text)
    with pytest.raises(ValueError):
        ours.encode(text)
    assert ours.encode(text, allowed_special="none") == ref.encode(text, disallowed_special=())
    assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert 50256 in ours.encode(text, allowed_special={"<|endoftext|>"})
    ours, ref = cl100k_pair
    assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    subset = {"<|fim_prefix|>"}
    with pytest.raises(ValueError):  # the other special still raises, as tiktoken
        ref.encode(text, allowed_special=subset)
    with pytest.raises(ValueError):
        ours.encode(text, allowed_special=subset)
    assert ours.encode("x<|fim_prefix|>", allowed_special=subset) == ref.encode("x<|fim_prefix|>", allowed_special=subset)


def test_decode_invalid_utf8_and_bad_ids(gpt2_pair):
    ours, ref = gpt2_pair
    ids = ours.encode("😀")
    assert ours.decode(ids[:1]) == ref.decode(ids[:1])  # a partial emoji: U+FFFD
    with pytest.raises(ValueError):
        ours.decode([50257])
    with pytest.raises(ValueError):
        ours.decode([-1])
    import numpy as np

    assert ours.decode(np.array(ref.encode("array ids"), dtype=np.int64)) == "array ids"


def test_gpt2_tokenizer_helper(gpt2_pair):
    ours, ref = gpt2_pair
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world, <3") == ref.encode("Hello world, <3")


def test_gpt2_files_whose_merges_do_not_make_the_vocabulary_are_refused(tmp_path, gpt2_files):
    encoder_json, vocab_bpe = gpt2_files
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")  # "#version", then merge 0 = "Ġ t", merge 1 = "Ġ a"
    cases = {"swapped": [lines[0], lines[2], lines[1], *lines[3:]],  # merge 0 would make token 257, not 256
             "unknown part": [lines[0], "Ġ \u4e00\u4e00", *lines[2:]]}
    for name, text in cases.items():
        bad = tmp_path / f"{name}.bpe"
        bad.write_text("\n".join(text), encoding="utf-8")
        with pytest.raises(CheckpointError, match="does not create token 256") as err:
            BPETokenizer.from_gpt2_files(encoder_json, bad)
        assert str(bad) in str(err.value), name


def test_the_tiktoken_fast_path_imports_neither_regex_nor_rich(tmp_path):
    # GPT-2's vocabulary, sharded through tiktoken with the progress bar off: our split regex and the
    # bar's library are never needed, so a `gptcore prepare` process does not pay their imports
    code = ("import sys\n"
            "from gptcore.data.sharding import prepare_shards\n"
            "from gptcore.tokenizer import gpt2_tokenizer\n"
            f"m = prepare_shards(iter(['hello world'] * 4), gpt2_tokenizer(), {str(tmp_path)!r}, num_proc=2, progress=False)\n"
            "print(m['splits']['train']['tokens'] + m['splits']['val']['tokens'], sorted({'regex', 'rich'} & set(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ", 1) == ["12", "[]\n"]  # 4 x [eot, "hello", " world"]


def test_save_load_roundtrip_and_sha(tmp_path, gpt2_pair):
    ours, ref = gpt2_pair
    path = ours.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    back = BPETokenizer.load(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "Save me: 'quoted' 😀 \n\n  done"
    assert back.encode(text) == again.encode(text) == ref.encode(text)
    assert back.sha256 == ours.sha256 == again.sha256
    assert list(tmp_path.joinpath("tok").iterdir()) == [path]  # no temp leftovers


def test_tokenizer_json_is_the_stdlib_json_of_its_content(tmp_path, gpt2_pair):
    # the file and its sha256 are written with the merges encoded once; both must be exactly what
    # json.dumps gives: the file in key order, the hash over the sorted canonical text without "sha256"
    import hashlib
    import json

    small = BPETokenizer.from_merges([(104, 105), (256, 33)], "gpt2", {"<|é|>": 258, "<|zz|>": 259})  # unsorted
    for name, tok in (("gpt2", gpt2_pair[0]), ("small", small)):
        data = tok.save(tmp_path / name).read_bytes()
        content = json.loads(data)
        sha = content.pop("sha256")
        assert data == (json.dumps({**content, "sha256": sha}, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        canonical = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        assert sha == hashlib.sha256(canonical.encode("utf-8")).hexdigest() == tok.sha256, name
        assert list(content["special_tokens"]) == list(tok.special_tokens), name  # file order kept


def test_load_refuses_corruption(tmp_path, gpt2_pair):
    import json

    ours, _ = gpt2_pair
    path = ours.save(tmp_path / "tok")
    good = path.read_text()
    cases = {
        "truncated": good[: len(good) // 2],
        "checksum": good.replace('"merges":[[', '"merges":[[1,2],[', 1),
        "version": json.dumps({**json.loads(good), "version": 99}),
        "format": json.dumps({**json.loads(good), "format": "other"}),
    }
    for name, text in cases.items():
        path.write_text(text)
        with pytest.raises(CheckpointError) as err:
            BPETokenizer.load(tmp_path / "tok")
        assert "tokenizer.json" in str(err.value), name
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "missing")


def test_pickle_is_cheap_and_equal(gpt2_pair):
    ours, _ = gpt2_pair
    ours.encode("warm the cache " * 100)
    blob = pickle.dumps(ours)
    assert len(blob) < 2_000_000
    back = pickle.loads(blob)
    assert back.encode("pickled tokenizer 😀") == ours.encode("pickled tokenizer 😀")


def test_encode_batch_processes(gpt2_pair, monkeypatch):
    import gptcore.tokenizer.parallel as T

    ours, ref = gpt2_pair
    texts = [f"document {i}: " + "def f(x): return x\n" * (i % 7) for i in range(40)]
    monkeypatch.setattr(T, "_PARALLEL_MIN_CHARS", 0)  # force the process pool on a small batch
    assert ours.encode_batch(texts, num_threads=2) == ref.encode_ordinary_batch(texts)
    assert ours.encode_batch(texts, num_threads=1) == ref.encode_ordinary_batch(texts)


def test_to_tiktoken_and_save_tiktoken(tmp_path, cl100k_pair, cl100k_file):
    ours, ref = cl100k_pair
    enc = ours.to_tiktoken()
    text = "tiktoken export: ids equal ✓ 1234 \n\n"
    assert enc.encode(text) == ref.encode(text)
    out = ours.save_tiktoken(tmp_path / "x.tiktoken")
    assert load_tiktoken_bpe(str(out)) == load_tiktoken_bpe(str(cl100k_file))
    # a rank-only vocabulary saves as recovered merges and loads back to the same ranks
    back = load_tokenizer(ours.save(tmp_path / "cl100k").parent)
    assert back._ranks == load_tiktoken_bpe(str(cl100k_file)) and back.special_tokens == ref._special_tokens
    assert back.encode(text) == ref.encode(text)


def _stdlib_texts(limit_bytes):
    import glob
    import os
    import sysconfig

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    out, n = [], 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            out.append(fh.read())
        n += len(out[-1])
        if n > limit_bytes:
            break
    return out


@pytest.mark.slow
def test_stdlib_corpus_equals_tiktoken(gpt2_pair, cl100k_pair):
    texts = _stdlib_texts(5_000_000)
    for ours, ref in (gpt2_pair, cl100k_pair):
        for t in texts:
            assert ours.encode_ordinary(t) == ref.encode_ordinary(t)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_texts, st.text(alphabet=st.characters(codec="utf-8"), max_size=300)))
def test_fuzz_long_both_equal_tiktoken(gpt2_pair, cl100k_pair, text):
    for ours, ref in (gpt2_pair, cl100k_pair):
        assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
