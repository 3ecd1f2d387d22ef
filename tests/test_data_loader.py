"""ShardLoader and the fixed validation pass: windows read back against the token stream
(rebuilt from the shard files with numpy alone), seeds, disjoint ranks, exact resume, checks."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcore.data.sharding import ShardLoader, bytes_per_token, iter_eval_batches, prepare_shards, write_shard
from gptcore.errors import DataError


class ByteTokenizer:
    """Every UTF-8 byte b is id b; eot is 256. Enough to make shards of known content."""

    def __init__(self, salt=""):
        self.vocab_size, self.eot_id = 257, 256
        self.sha256 = hashlib.sha256(f"bytes{salt}".encode()).hexdigest()

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    docs = [f"document {i} " + "abcdefghij"[i % 10] * (50 + 37 * (i % 13)) for i in range(400)]
    prepare_shards(iter(docs), ByteTokenizer(), out, shard_tokens=9000, val_fraction=0.1, num_proc=1)
    return out


def stream(data_dir, split):
    """The split's token stream, read with numpy alone (skip each 1024-byte header)."""
    m = json.loads((data_dir / "manifest.json").read_text())
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype="<u2", offset=1024) for s in m["splits"][split]["shards"]])


def test_batches_are_windows_of_the_token_stream(data_dir):
    toks = stream(data_dir, "train")
    loader = ShardLoader(data_dir, "train", batch_size=8, block_size=64, seed=1, tokenizer=ByteTokenizer())
    assert len(loader.shards) > 3  # windows cross shard boundaries below
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    for row, j in zip(range(8), loader.order(0)[:8]):
        window = toks[j * 64: j * 64 + 65]
        assert x[row].tolist() == window[:-1].tolist() and y[row].tolist() == window[1:].tolist()
    assert loader.num_windows == (len(toks) - 1) // 64


def test_one_epoch_visits_every_window_once(data_dir):
    loader = ShardLoader(data_dir, "train", batch_size=7, block_size=100, seed=0)
    seen = []
    for _ in range(len(loader)):
        x, _ = loader.next_batch()
        seen += [tuple(r) for r in x.tolist()]
    order = loader.order(0)
    assert sorted(order.tolist()) == list(range(loader.num_windows))  # a permutation of all windows
    toks = stream(data_dir, "train")
    assert seen[: loader.num_windows] == [tuple(toks[j * 100: j * 100 + 100].tolist()) for j in order]
    assert not np.array_equal(loader.order(1), order)  # a new order next epoch


def test_seeded_order_is_deterministic(data_dir):
    a = ShardLoader(data_dir, "train", 4, 32, seed=5)
    b = ShardLoader(data_dir, "train", 4, 32, seed=5)
    c = ShardLoader(data_dir, "train", 4, 32, seed=6)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(p, b.next_batch()[0]) for p in batches_a)
    assert not all(torch.equal(p, c.next_batch()[0]) for p in batches_a)


def test_ranks_read_disjoint_windows(data_dir):
    ranks = [ShardLoader(data_dir, "train", 4, 32, rank=r, world_size=3, seed=2) for r in range(3)]
    orders = [set(r.order(0).tolist()) for r in ranks]
    assert all(len(o) == ranks[0].per_rank for o in orders)
    assert not (orders[0] & orders[1]) and not (orders[0] & orders[2]) and not (orders[1] & orders[2])
    # and the batches really come from those windows
    toks = stream(data_dir, "train")
    x, _ = ranks[1].next_batch()
    assert x[0].tolist() == toks[ranks[1].order(0)[0] * 32:][:32].tolist()


def test_state_dict_resumes_at_the_exact_next_batch_across_epochs(data_dir):
    a = ShardLoader(data_dir, "train", 16, 128, seed=3)
    steps = len(a) + 3  # past an epoch boundary
    for _ in range(steps):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (checkpoints)
    expected = [a.next_batch() for _ in range(3)]
    b = ShardLoader(data_dir, "train", 16, 128, seed=3)
    b.load_state_dict(state)
    for x, y in expected:
        bx, by = b.next_batch()
        assert torch.equal(x, bx) and torch.equal(y, by)
    with pytest.raises(DataError, match="block_size"):
        ShardLoader(data_dir, "train", 16, 64, seed=3).load_state_dict(state)


def test_eval_batches_are_a_fixed_sequential_pass(data_dir):
    toks = stream(data_dir, "val")
    batches = list(iter_eval_batches(data_dir, batch_size=5, block_size=50))
    n = (len(toks) - 1) // 50
    assert sum(len(x) for x, _ in batches) == n and len(batches) == -(-n // 5)
    x = torch.cat([b[0] for b in batches])
    assert x.flatten().tolist() == toks[: n * 50].tolist()  # windows 0, 1, 2, ... in order
    again = list(iter_eval_batches(data_dir, batch_size=5, block_size=50, max_batches=2))
    assert len(again) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(again, batches))
    m = json.loads((data_dir / "manifest.json").read_text())
    assert bytes_per_token(data_dir, "val") == m["splits"]["val"]["bytes"] / m["splits"]["val"]["tokens"]


def test_tokenizer_mismatch_names_the_manifest(data_dir):
    with pytest.raises(DataError, match="tokenizer") as err:
        ShardLoader(data_dir, "train", 4, 32, tokenizer=ByteTokenizer(salt="other"))
    assert str(data_dir / "manifest.json") in str(err.value) and "prepare" in str(err.value)


def test_damaged_or_incomplete_data_is_refused(tmp_path):
    docs = [f"doc {i} " * 40 for i in range(50)]
    prepare_shards(iter(docs), ByteTokenizer(), tmp_path, shard_tokens=2000, val_fraction=0.2, num_proc=1)
    shard = tmp_path / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # one token short
    with pytest.raises(DataError, match="truncated") as err:
        ShardLoader(tmp_path, "train", 2, 16)
    assert str(shard) in str(err.value)

    write_shard(shard, np.arange(10, dtype=np.uint16))  # a valid shard, but not the one listed
    with pytest.raises(DataError, match="manifest says"):
        ShardLoader(tmp_path, "train", 2, 16)

    with pytest.raises(DataError, match="too few"):
        ShardLoader(tmp_path, "val", 2, 10**6)

    m = json.loads((tmp_path / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="interrupted"):
        ShardLoader(tmp_path, "val", 2, 16)
    with pytest.raises(DataError, match="prepare"):
        ShardLoader(Path(tmp_path) / "nowhere", "val", 2, 16)


def test_a_flipped_byte_or_an_out_of_range_id_is_one_clear_error(tmp_path):
    """Shards are checked against the manifest's sha256 on first open, and ids against the vocabulary."""
    import json as _json

    from gptcore.data.sharding import _VERIFIED
    from gptcore.errors import DataError

    from gptcore.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["def f(x):\n    return x\n" * 200, "class A:\n    pass\n" * 200], vocab_size=300)
    prepare_shards(["def f(x):\n    return x + 1\n" * 300] * 8, tok, tmp_path, shard_tokens=4000, val_fraction=0.3)
    ShardLoader(tmp_path, "train", 2, 16)  # intact: fine
    with pytest.raises(DataError, match="token id .* vocabulary has 100 ids"):
        _VERIFIED.clear()
        ShardLoader(tmp_path, "train", 2, 16, vocab_size=100)
    manifest = _json.loads((tmp_path / "manifest.json").read_text())
    val = tmp_path / manifest["splits"]["val"]["shards"][0]["file"]
    blob = bytearray(val.read_bytes())
    blob[-3] ^= 1  # one token changed; header and size intact
    val.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"sha256 in its manifest.*val_"):
        next(iter_eval_batches(tmp_path, 2, 16))  # the evaluations' path (val_metrics)
    with pytest.raises(DataError, match="sha256 in its manifest"):
        ShardLoader(tmp_path, "val", 2, 16)
