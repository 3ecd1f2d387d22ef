"""The data layer: shard byte layout (against a hand-written llm.c header), sources, sharding
(against a reference built document by document), the split rule, resume, bad input, the CLI."""

import hashlib
import json
import os
import random
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gptcore.config import config_from_dict
from gptcore.data.sharding import (
    cap_bytes,
    download,
    encoder_for,
    iter_documents,
    prepare,
    prepare_shards,
    python_stdlib_documents,
    read_jsonl_documents,
    read_shard,
    split_of,
    write_shard,
    write_shard_parts,
)
from gptcore.errors import DataError
from gptcore.fileio import sha256_file
from gptcore.data.sources import parse_hf_source
from gptcore.tokenizer import BPETokenizer

WORDS = "the of and to in is def return class import self if else for while with as print value list data".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """n varied documents (ASCII words, some accents and emoji), 50..1500 characters each."""
    rng = random.Random(seed)
    extra = ["café", "naïve", "😀", "中文", "\n", "\t", "    "]
    return [f"doc {i}: " + " ".join(rng.choice(WORDS + extra) for _ in range(rng.randint(10, 250))) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(make_docs(40, seed=99), vocab_size=300)


class CountingTokenizer:
    """Wraps a tokenizer and counts encode_ordinary calls (in-process runs only)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.vocab_size, self.eot_id, self.sha256 = inner.vocab_size, inner.eot_id, inner.sha256

    def encode_ordinary(self, text):
        self.calls += 1
        return self.inner.encode_ordinary(text)


class ByteTokenizer:
    """A minimal tokenizer: every UTF-8 byte b is id offset + b; eot is offset + 256."""

    def __init__(self, offset=0):
        self.offset, self.vocab_size, self.eot_id = offset, offset + 257, offset + 256
        self.sha256 = hashlib.sha256(f"bytes+{offset}".encode()).hexdigest()

    def encode_ordinary(self, text):
        return [self.offset + b for b in text.encode("utf-8")]


def reference_splits(docs, tokenizer, val_fraction):
    """What the shards must hold, built the slow obvious way: per document, hash -> split, [eot]+ids."""
    out = {"train": [], "val": []}
    for d in docs:
        h = int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest(), "big")
        out["val" if h / 2**64 < val_fraction else "train"].append(d)
    if not out["val"]:
        out["val"].append(out["train"].pop())
    if not out["train"]:
        out["train"].append(out["val"].pop())
    return {s: np.array([t for d in ds for t in [tokenizer.eot_id, *tokenizer.encode_ordinary(d)]]) for s, ds in out.items()}, out


def shard_stream(out_dir, manifest, split):
    """A split's tokens read back with numpy alone, the way llm.c's loader does."""
    parts = []
    for s in manifest["splits"][split]["shards"]:
        raw = Path(out_dir, s["file"]).read_bytes()
        header = np.frombuffer(raw[:1024], dtype="<i4")
        assert header[0] == 20240520 and header[1] in (1, 2)
        parts.append(np.frombuffer(raw[1024:], dtype="<u2" if header[1] == 1 else "<u4"))
        assert len(parts[-1]) == header[2]
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# the .bin layout


def test_shard_bytes_match_a_hand_written_llmc_header(tmp_path):
    write_shard(tmp_path / "a.bin", [50256, 0, 65535, 7])
    expected = struct.pack("<256i", 20240520, 1, 4, *([0] * 253)) + struct.pack("<4H", 50256, 0, 65535, 7)
    assert (tmp_path / "a.bin").read_bytes() == expected

    write_shard(tmp_path / "b.bin", [70000, 1])  # ids above uint16: version 2, uint32 tokens
    expected = struct.pack("<256i", 20240520, 2, 2, *([0] * 253)) + struct.pack("<2I", 70000, 1)
    assert (tmp_path / "b.bin").read_bytes() == expected


def test_shard_written_in_parts_is_the_llmc_file_and_its_sha256(tmp_path):
    # the writer's path: a shard's tokens as several arrays (slices of documents), never joined in memory
    doc = np.array([50256, 31373, 995, 65535], dtype=np.uint16)
    sha = write_shard_parts(tmp_path / "a.bin", [doc[1:], doc, np.array([7], dtype=np.int64)], np.uint16)
    expected = struct.pack("<256i", 20240520, 1, 8, *([0] * 253)) + struct.pack("<8H", 31373, 995, 65535, 50256, 31373,
                                                                                   995, 65535, 7)
    assert (tmp_path / "a.bin").read_bytes() == expected
    assert sha == hashlib.sha256(expected).hexdigest()  # hashed as written = the file's own sha256

    sha = write_shard_parts(tmp_path / "b.bin", [np.array([70000], dtype=np.uint32), np.array([1, 2])], np.uint32)
    expected = struct.pack("<256i", 20240520, 2, 3, *([0] * 253)) + struct.pack("<3I", 70000, 1, 2)
    assert (tmp_path / "b.bin").read_bytes() == expected and sha == hashlib.sha256(expected).hexdigest()
    with pytest.raises(ValueError):
        write_shard_parts(tmp_path / "c.bin", [np.array([], dtype=np.uint16)], np.uint16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_shard_round_trip_is_a_memmap(tmp_path):
    rng = np.random.default_rng(0)
    for hi, dtype in ((50257, np.uint16), (100277, np.uint32)):
        ids = rng.integers(0, hi, size=10_001)
        path = write_shard(tmp_path / f"{hi}.bin", ids.astype(dtype))
        back = read_shard(path)
        assert isinstance(back, np.memmap) and back.dtype == dtype
        np.testing.assert_array_equal(back, ids)
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_shard_refuses_bad_tokens_and_leaves_nothing(tmp_path):
    for bad in ([], [-1, 2], np.array([1 << 16], dtype=np.int64)):
        with pytest.raises(ValueError):
            write_shard(tmp_path / "x.bin", bad, dtype=np.uint16)
    assert list(tmp_path.iterdir()) == []


def _header(magic=20240520, version=1, n=3):
    return struct.pack("<256i", magic, version, n, *([0] * 253))


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (_header()[:100], "truncated header"),
    (_header(magic=12345) + b"\0" * 6, "wrong magic"),
    (_header(version=3) + b"\0" * 6, "unknown version"),
    (_header(n=3) + b"\0" * 4, "truncated"),
    (_header(n=3) + b"\0" * 8, "padded"),
    (_header(n=0), "no tokens"),
])
def test_damaged_shards_raise_naming_the_file(tmp_path, content, message):
    path = tmp_path / "train_000000.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:  # DataError is a ValueError
        read_shard(path)
    assert isinstance(err.value, DataError)
    assert message in str(err.value) and str(path) in str(err.value)


# --------------------------------------------------------------------------------------------
# sources


def test_python_stdlib_documents_are_the_stdlib_and_pydoc_topics_in_name_hash_order():
    import hashlib
    import sysconfig

    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = list(python_stdlib_documents())
    # reference order: sha256 of "file:<relative path>" / "topic:<name>", computed here independently
    named = [("file:" + p.relative_to(root).as_posix(), p) for p in root.glob("*.py")]
    named += [("topic:" + k, k) for k in topics]
    first_name, first = min(named, key=lambda n: hashlib.sha256(n[0].encode()).hexdigest())
    top_level_first = first.read_text(encoding="utf-8") if first_name.startswith("file:") else topics[first]
    assert top_level_first in docs
    topic_docs = [topics[k] for k in sorted(topics, key=lambda k: hashlib.sha256(("topic:" + k).encode()).hexdigest()) if topics[k].strip()]
    assert [d for d in docs if d in set(topic_docs)][: len(topic_docs)] == topic_docs  # topics keep their hash order
    assert list(python_stdlib_documents())[:50] == docs[:50]  # deterministic
    # a 4 MB prefix mixes packages and prose
    prefix, size = [], 0
    for d in docs:
        prefix.append(d)
        size += len(d.encode())
        if size > 4_000_000:
            break
    assert not any("gencodec.py" in d[:300] for d in docs)  # generated codec tables are left out
    assert any(d in set(topic_docs) for d in prefix)
    # reference count: os.walk, pruning third-party and test folders, readable non-empty UTF-8 files
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")]
        for f in filenames:
            if f.endswith(".py"):
                try:
                    text = Path(dirpath, f).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                n += bool(text.strip()) and "with gencodec.py" not in text.splitlines()[0]
    assert len(docs) == n + sum(1 for t in topics.values() if t.strip())


def test_cap_bytes_cuts_on_a_character_boundary():
    docs = ["abc", "é" * 10, "tail"]  # "é" is 2 bytes in UTF-8
    capped = list(cap_bytes(docs, 8))
    assert capped == ["abc", "éé"]  # 3 + 4 bytes; a third "é" would cross the cap at 9
    assert sum(len(d.encode()) for d in cap_bytes(make_docs(50), 5000)) <= 5000
    assert list(cap_bytes(docs, None)) == docs


def test_max_bytes_caps_the_stdlib_source():
    section = config_from_dict({"data": {"max_bytes": 20_000}}).data
    docs = list(iter_documents(section))
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 19_990 <= total <= 20_000 and len(docs) >= 1


def _write_local_corpus(root: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "a.txt").write_text("first file\nwith two lines\n", encoding="utf-8")
    (root / "b.txt").write_text("second file ☃", encoding="utf-8")
    (root / "c.jsonl").write_text(json.dumps({"text": "json one", "id": 1}) + "\n" + json.dumps({"text": "json two", "id": 2}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), root / "d.parquet")


def test_files_source_streams_txt_jsonl_parquet_through_datasets(tmp_path):
    _write_local_corpus(tmp_path)
    section = config_from_dict({"data": {"source": f"files:{tmp_path}/*"}}).data
    docs = list(iter_documents(section))
    assert docs == ["first file\nwith two lines\n", "second file ☃", "json one", "json two", "pq one", "pq two"]
    section = config_from_dict({"data": {"source": f"files:{tmp_path}/*", "max_bytes": 30}}).data
    assert list(iter_documents(section)) == ["first file\nwith two lines\n", "seco"]  # 26 + 4 bytes


def test_files_source_errors_name_the_problem(tmp_path):
    _write_local_corpus(tmp_path)
    section = config_from_dict({"data": {"source": f"files:{tmp_path}/*.jsonl", "text_field": "body"}}).data
    with pytest.raises(DataError, match="no column 'body'.*text.*id"):
        list(iter_documents(section))
    with pytest.raises(DataError, match="no files match"):
        list(iter_documents(config_from_dict({"data": {"source": f"files:{tmp_path}/*.nothing"}}).data))
    (tmp_path / "e.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported.*csv"):
        list(iter_documents(config_from_dict({"data": {"source": f"files:{tmp_path}/*"}}).data))


def test_hf_source_parsing_and_offline_error():
    assert parse_hf_source("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train") == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    assert parse_hf_source("hf:roneneldan/TinyStories@validation") == ("roneneldan/TinyStories", None, "validation")
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", "train")
    section = config_from_dict({"data": {"source": "hf:no-such-user/no-such-dataset"}}).data
    with pytest.raises(DataError, match="cannot open dataset") as err:  # tests run with HF_HUB_OFFLINE=1
        next(iter_documents(section))
    assert "hf:no-such-user/no-such-dataset" in str(err.value)


def test_hf_source_streams_a_local_dataset_folder(tmp_path):
    """The hf: path end to end, offline: `load_dataset(<folder>, streaming=True)` on local JSONL."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"content": f"row {i} " + "x" * i, "n": i} for i in range(25)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = config_from_dict({"data": {"source": f"hf:{folder}@train", "text_field": "content", "max_bytes": 100}}).data
    docs = list(iter_documents(section))
    assert docs[:3] == ["row 0 ", "row 1 x", "row 2 xx"]
    assert sum(len(d) for d in docs) == 100
    section = config_from_dict({"data": {"source": f"hf:{folder}"}}).data
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(section))


def test_download_writes_jsonl_atomically_and_reads_back(tmp_path):
    _write_local_corpus(tmp_path)
    section = config_from_dict({"data": {"source": f"files:{tmp_path}/*"}}).data
    info = download(section, tmp_path / "out" / "corpus.jsonl")
    docs = list(iter_documents(section))
    assert info == {"path": str(tmp_path / "out" / "corpus.jsonl"), "sha256": sha256_file(tmp_path / "out" / "corpus.jsonl"),
                    "bytes": sum(len(d.encode()) for d in docs), "documents": len(docs)}
    assert list(read_jsonl_documents(info["path"])) == docs

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    empty = config_from_dict({"data": {"source": f"files:{tmp_path}/empty/*.txt"}}).data
    with pytest.raises(DataError, match="no documents"):
        download(empty, tmp_path / "empty_out" / "corpus.jsonl")
    assert list((tmp_path / "empty_out").iterdir()) == []  # nothing half-written


def test_read_jsonl_documents_names_the_bad_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match="line 2") as err:
        list(read_jsonl_documents(p))
    assert str(p) in str(err.value)


# --------------------------------------------------------------------------------------------
# sharding


def test_prepare_shards_matches_the_reference_split_and_tokens(tmp_path, tok):
    docs = make_docs(120)
    m = prepare_shards(iter(docs), tok, tmp_path, shard_tokens=5000, val_fraction=0.1, num_proc=1, source="test")
    ref, ref_docs = reference_splits(docs, tok, 0.1)
    for split in ("train", "val"):
        s = m["splits"][split]
        np.testing.assert_array_equal(shard_stream(tmp_path, m, split), ref[split])
        assert s["tokens"] == len(ref[split])
        assert s["documents"] == len(ref_docs[split]) > 0
        assert s["bytes"] == sum(len(d.encode("utf-8")) for d in ref_docs[split])
        assert all(e["tokens"] == 5000 for e in s["shards"][:-1]) and 0 < s["shards"][-1]["tokens"] <= 5000
        assert [e["file"] for e in s["shards"]] == [f"{split}_{i:06d}.bin" for i in range(len(s["shards"]))]
        assert all(e["sha256"] == sha256_file(tmp_path / e["file"]) for e in s["shards"])
    assert len(m["splits"]["train"]["shards"]) > 2
    assert m["tokenizer_sha256"] == tok.sha256 and m["vocab_size"] == tok.vocab_size and m["source"] == "test"
    assert m["complete"] and json.loads((tmp_path / "manifest.json").read_text()) == m
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".bin") == sorted(
        e["file"] for s in m["splits"].values() for e in s["shards"])


def test_two_processes_write_the_same_shards_as_one(tmp_path, tok):
    docs = make_docs(300)
    m1 = prepare_shards(iter(docs), tok, tmp_path / "p1", shard_tokens=7000, val_fraction=0.05, num_proc=1)
    m2 = prepare_shards(iter(docs), tok, tmp_path / "p2", shard_tokens=7000, val_fraction=0.05, num_proc=2)
    assert m1["splits"] == m2["splits"]


EDGE_DOCS = ["<|endoftext|> is ordinary text here", "   \n\n\t  ", "x" * 3000, "1040 2024.5 'll 've 're", "😀😀 café 中文"]


@pytest.mark.parametrize("kind", ["trained-gpt4", "trained-gpt2", "openai-gpt2"])
def test_tiktoken_fast_path_writes_byte_identical_shards(tmp_path, tok, gpt2_files, kind):
    """The fast path (tiktoken in threads) and our own encoder (the reference, in processes) write
    the same bytes: every shard and the manifest, with one worker and with two."""
    docs = make_docs(150, seed=3) + EDGE_DOCS
    tokenizer = {"trained-gpt4": lambda: tok,
                 "trained-gpt2": lambda: BPETokenizer.train(make_docs(40, seed=5), vocab_size=400, pattern="gpt2"),
                 "openai-gpt2": lambda: BPETokenizer.from_gpt2_files(*gpt2_files)}[kind]()
    assert encoder_for(tokenizer)[1] == "tiktoken" and encoder_for(tokenizer, "gptcore")[1] == "gptcore"
    runs = {(enc, n): tmp_path / f"{enc}{n}" for enc in ("gptcore", "tiktoken") for n in (1, 2)}
    for (enc, n), out in runs.items():
        prepare_shards(iter(docs), tokenizer, out, shard_tokens=3000, val_fraction=0.1, num_proc=n, encoder=enc)
    ref = runs[("gptcore", 1)]
    names = sorted(p.name for p in ref.iterdir() if p.is_file())
    assert len(names) > 4
    for out in runs.values():
        assert sorted(p.name for p in out.iterdir() if p.is_file()) == names
        for name in names:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), (out, name)


def test_tiktoken_shards_hold_tiktokens_own_gpt2_ids(tmp_path, gpt2_files):
    """Against the reference: tiktoken's GPT-2 Encoding built from OpenAI's files, not from ours."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from gptcore.tokenizer import PATTERNS

    encoder_json, vocab_bpe = gpt2_files
    ref = tiktoken.Encoding("gpt2", pat_str=PATTERNS["gpt2"], special_tokens={"<|endoftext|>": 50256},
                            mergeable_ranks=data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json)))
    docs = make_docs(60, seed=8) + EDGE_DOCS
    m = prepare_shards(iter(docs), BPETokenizer.from_gpt2_files(*gpt2_files), tmp_path, shard_tokens=10**6,
                       val_fraction=0.5, num_proc=2, encoder="tiktoken")
    splits = {s: [d for d in docs if split_of(d, 0.5) == s] for s in ("train", "val")}
    for s, ds in splits.items():
        assert shard_stream(tmp_path, m, s).tolist() == [t for d in ds for t in [50256, *ref.encode_ordinary(d)]]


def test_custom_split_stays_on_our_encoder(tmp_path):
    custom = BPETokenizer.train(make_docs(20), vocab_size=300, pattern=r"\w+|\s+|[^\w\s]+")
    assert custom.fast_encoder() is None and encoder_for(custom)[1] == "gptcore"
    with pytest.raises(DataError, match="tiktoken"):
        prepare_shards(iter(make_docs(10)), custom, tmp_path, encoder="tiktoken")
    with pytest.raises(DataError, match="unknown encoder"):
        prepare_shards(iter(make_docs(10)), custom, tmp_path, encoder="rust")


def test_split_is_stable_as_the_corpus_grows_and_never_empty(tmp_path, tok):
    docs = make_docs(400)
    assert [split_of(d, 0.1) for d in docs[:200]] == [split_of(d, 0.1) for d in docs][:200]
    small = prepare_shards(iter(docs[:200]), tok, tmp_path / "a", shard_tokens=10**6, val_fraction=0.1, num_proc=1)
    big = prepare_shards(iter(docs), tok, tmp_path / "b", shard_tokens=10**6, val_fraction=0.1, num_proc=1)
    val_small = shard_stream(tmp_path / "a", small, "val")
    val_big = shard_stream(tmp_path / "b", big, "val")
    np.testing.assert_array_equal(val_big[: len(val_small)], val_small)  # growing only appends

    # two documents and a val_fraction that would put both in one split: still one each
    for frac in (1e-9, 1 - 1e-9):
        m = prepare_shards(iter(docs[:2]), tok, tmp_path / f"tiny{frac}", shard_tokens=100, val_fraction=frac, num_proc=1)
        assert m["splits"]["train"]["documents"] == 1 and m["splits"]["val"]["documents"] == 1
    with pytest.raises(DataError, match="1 document"):
        prepare_shards(iter(docs[:1]), tok, tmp_path / "one", shard_tokens=100, val_fraction=0.5, num_proc=1)


def test_large_vocabulary_uses_uint32_version_2(tmp_path):
    bt = ByteTokenizer(offset=70_000)  # ids 70000..70256
    m = prepare_shards(iter(make_docs(20)), bt, tmp_path, shard_tokens=3000, val_fraction=0.2, num_proc=1)
    assert m["dtype"] == "uint32"
    raw = (tmp_path / "train_000000.bin").read_bytes()
    assert struct.unpack("<3i", raw[:12]) == (20240520, 2, 3000)
    assert read_shard(tmp_path / "train_000000.bin")[0] == 70_256  # eot first


def _interrupted(docs, n):
    """The documents, then Ctrl-C after n of them."""
    for i, d in enumerate(docs):
        if i == n:
            raise KeyboardInterrupt
        yield d


def _interrupted_after_bytes(docs, limit):
    """The documents, then Ctrl-C once more than `limit` UTF-8 bytes have gone by."""
    seen = 0
    for d in docs:
        if seen > limit:
            raise KeyboardInterrupt
        seen += len(d.encode("utf-8"))
        yield d


def test_resume_after_interruption_skips_finished_shards(tmp_path, tok):
    docs = make_docs(300, seed=3)
    full = prepare_shards(iter(docs), tok, tmp_path / "full", shard_tokens=4000, val_fraction=0.1, num_proc=1)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(_interrupted(docs, 200), tok, out, shard_tokens=4000, val_fraction=0.1, num_proc=1)
    partial = json.loads((out / "manifest.json").read_text())
    done = len(partial["splits"]["train"]["shards"])
    assert not partial["complete"] and done >= 3
    assert not list(out.glob(".*.tmp"))
    (out / partial["splits"]["train"]["shards"][-1]["file"]).write_bytes(b"\0")  # a damaged last shard: redone

    # each split restarts at the document where its last intact shard ends; earlier ones are only hashed
    kept = {"train": partial["splits"]["train"]["shards"][:-1], "val": partial["splits"]["val"]["shards"]}
    restart = {s: kept[s][-1]["end"][0] if kept[s] else -1 for s in kept}
    expected_calls = sum(1 for i, d in enumerate(docs) if i >= restart[split_of(d, 0.1)])
    assert expected_calls < 0.8 * len(docs)

    counting = CountingTokenizer(tok)
    m = prepare_shards(iter(docs), counting, out, shard_tokens=4000, val_fraction=0.1, num_proc=1)
    assert m["splits"] == full["splits"]  # byte-identical shards, same counts
    assert counting.calls == expected_calls

    counting.calls = 0
    assert prepare_shards(iter(docs), counting, out, shard_tokens=4000, val_fraction=0.1, num_proc=1) == m
    assert counting.calls == 0  # complete and intact: nothing to do


def test_resume_refuses_a_different_corpus(tmp_path, tok):
    docs = make_docs(300, seed=3)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(_interrupted(docs, 200), tok, tmp_path, shard_tokens=4000, val_fraction=0.1, num_proc=1)
    other = make_docs(300, seed=4)
    with pytest.raises(DataError, match="corpus differs") as err:
        prepare_shards(iter(other), tok, tmp_path, shard_tokens=4000, val_fraction=0.1, num_proc=1)
    assert "manifest.json" in str(err.value)


def test_new_settings_start_over_and_remove_stale_shards(tmp_path, tok):
    docs = make_docs(100)
    prepare_shards(iter(docs), tok, tmp_path, shard_tokens=2000, val_fraction=0.1, num_proc=1)
    m = prepare_shards(iter(docs), tok, tmp_path, shard_tokens=50_000, val_fraction=0.1, num_proc=1)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    assert m["settings"]["shard_tokens"] == 50_000


def test_sharding_memory_does_not_grow_with_the_corpus(tmp_path):
    bt = ByteTokenizer()

    def corpus(n):  # a generator: the corpus never exists as a list
        rng = random.Random(0)
        for i in range(n):
            yield f"{i} " + "".join(rng.choice("abcdefgh ") for _ in range(2000))

    peaks = []
    for n in (300, 1200):
        tracemalloc.start()
        prepare_shards(corpus(n), bt, tmp_path / str(n), shard_tokens=50_000, val_fraction=0.05, num_proc=1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks  # 4x the corpus, about the same peak


# --------------------------------------------------------------------------------------------
# the whole stage and the CLI


def test_prepare_with_gpt2_vocabulary_matches_tiktoken(tmp_path, gpt2_files):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    encoder_json, vocab_bpe = gpt2_files
    orig = openai_public.data_gym_to_mergeable_bpe_ranks
    openai_public.data_gym_to_mergeable_bpe_ranks = lambda **k: data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    try:
        ref = tiktoken.Encoding(**openai_public.gpt2())
    finally:
        openai_public.data_gym_to_mergeable_bpe_ranks = orig

    cfg = config_from_dict({"data": {"max_bytes": 30_000, "shard_tokens": 4000, "val_fraction": 0.3, "num_proc": 1},
                            "tokenizer": {"path": "gpt2"}})
    m = prepare(cfg, tmp_path)
    assert m["vocab_size"] == 50257 and m["dtype"] == "uint16"
    docs = list(iter_documents(cfg.data))
    both = np.concatenate([shard_stream(tmp_path, m, "train"), shard_stream(tmp_path, m, "val")])
    expected = [t for d in docs for t in [50256, *ref.encode_ordinary(d)]]
    assert sorted(both.tolist()) == sorted(expected)  # same tokens, split between train and val
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(docs)
    from gptcore.tokenizer import load_tokenizer

    assert load_tokenizer(tmp_path / "tokenizer").sha256 == m["tokenizer_sha256"]


def test_prepare_trains_a_tokenizer_and_is_idempotent(tmp_path):
    cfg = config_from_dict({"data": {"max_bytes": 40_000, "shard_tokens": 5000, "num_proc": 1},
                            "tokenizer": {"vocab_size": 300}})
    m = prepare(cfg, tmp_path)
    from gptcore.tokenizer import load_tokenizer

    saved = load_tokenizer(tmp_path / "tokenizer")
    assert saved.sha256 == m["tokenizer_sha256"] and saved.vocab_size == 300
    ref, _ = reference_splits(list(iter_documents(cfg.data)), saved, cfg.data.val_fraction)
    np.testing.assert_array_equal(shard_stream(tmp_path, m, "train"), ref["train"])
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert prepare(cfg, tmp_path) == m
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_interrupted_prepare_resumes_with_the_same_tokenizer(tmp_path, monkeypatch):
    import gptcore.data.sharding as data_mod
    import gptcore.tokenizer as tok_mod

    cfg = config_from_dict({"data": {"max_bytes": 400_000, "shard_tokens": 4000, "num_proc": 1, "val_fraction": 0.2},
                            "tokenizer": {"vocab_size": 300}})
    clean = prepare(cfg, tmp_path / "clean")

    real = data_mod.iter_documents
    calls = []

    def interrupt_while_sharding(section):  # 1st call: the probed stream that feeds the shards, 2nd: tokenizer
        calls.append(1)
        return _interrupted_after_bytes(real(section), 320_000) if len(calls) == 1 else real(section)  # mid-corpus

    monkeypatch.setattr(data_mod, "iter_documents", interrupt_while_sharding)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "d")
    monkeypatch.setattr(data_mod, "iter_documents", real)
    partial = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert not partial["complete"] and partial["splits"]["train"]["shards"]

    def no_training(*a, **k):
        raise AssertionError("the saved tokenizer of the interrupted run should be reused")

    monkeypatch.setattr(tok_mod, "train_tokenizer", no_training)
    resumed = prepare(cfg, tmp_path / "d")
    assert resumed["splits"] == clean["splits"] and resumed["tokenizer_sha256"] == clean["tokenizer_sha256"]


def test_cli_prepare_from_local_files(tmp_path, run_cli):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_local_corpus(corpus)
    for i in range(30):
        (corpus / f"more_{i:02d}.txt").write_text(" ".join(make_docs(1, seed=i)), encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: files:{corpus}/*\n  shard_tokens: 3000\ntokenizer:\n  vocab_size: 280\n")
    r = run_cli("prepare", cfg, "--out", tmp_path / "d", "--set", "data.val_fraction=0.2")
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stdout and "val:" in r.stdout
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["complete"] and (tmp_path / "d" / "tokenizer" / "tokenizer.json").is_file()
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 36

    r = run_cli("prepare", cfg, "--out", tmp_path / "bad", "--set", "data.text_field=body", "--set", f"data.source=files:{corpus}/*.jsonl")
    assert r.returncode == 2 and r.stderr.startswith("error: no column 'body'") and "Traceback" not in r.stderr
    assert not (tmp_path / "bad" / "manifest.json").exists() and not list((tmp_path / "bad").glob("*.bin"))
