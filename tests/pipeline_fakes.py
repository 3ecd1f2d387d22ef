"""Stand-ins for the gptcore library functions the pipeline calls, for testing orchestration alone.

Each stand-in honours the contract's signature and output shape, does almost no work, and counts
its calls in `CALLS`, so a test can tell a cache hit (no call) from a computed stage (a call).
The pre-training stand-in's val bpb is `1 / train.lr`, so a test can choose which run "wins".
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from gptcore.fileio import atomic_dir, atomic_write_json, atomic_write_text, sha256_bytes, sha256_file, sha256_tree

CALLS: Counter = Counter()


class FakeTokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.sha256 = sha256_bytes(f"fake-{vocab_size}".encode())

    def save(self, directory):
        atomic_write_json(Path(directory) / "tokenizer.json", {"vocab_size": self.vocab_size, "sha256": self.sha256})


def load_tokenizer(directory):
    d = json.loads((Path(directory) / "tokenizer.json").read_text())
    return FakeTokenizer(d["vocab_size"])


def train_tokenizer(texts, section):
    CALLS["train_tokenizer"] += 1
    assert sum(1 for _ in texts) > 0
    return FakeTokenizer(section.vocab_size)


def download(section, out_file):
    CALLS["download"] += 1
    docs = [f"doc {i} " * 20 for i in range(section.max_bytes // 100 if section.max_bytes else 10)]
    atomic_write_text(out_file, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"path": str(out_file), "sha256": sha256_file(out_file), "bytes": sum(map(len, docs)), "documents": len(docs)}


def read_jsonl_documents(path):
    with open(path) as f:
        for line in f:
            yield json.loads(line)["text"]


def prepare_shards(documents, tokenizer, out_dir, shard_tokens=0, val_fraction=0.1, num_proc=None, source=""):
    CALLS["shard"] += 1
    n = sum(len(d) for d in documents)
    manifest = {"splits": {"train": {"tokens": n, "bytes": n}, "val": {"tokens": n // 10, "bytes": n // 10}},
                "complete": True, "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size}
    atomic_write_json(Path(out_dir) / "manifest.json", manifest)
    return manifest


def _save_model(final: Path, payload: dict) -> None:
    with atomic_dir(final) as tmp:
        atomic_write_json(tmp / "config.json", payload)
        atomic_write_text(tmp / "model.safetensors", "weights " + json.dumps(payload))


def pretrain(config, data_dir, out_dir, callbacks=()):
    CALLS["pretrain"] += 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val_bpb = 1.0 / config.train.lr
    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": config.train.lr, "tokens_per_s": 1000.0, "mfu": 0.01}
            for s in range(1, config.train.max_steps + 1)]
    rows.append({"step": config.train.max_steps, "val_loss": 4.0, "val_bpb": val_bpb})
    with open(out / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            for cb in callbacks:
                cb("eval" if "val_loss" in r else "log", r)
    _save_model(out / "final", {"model": config.model.model_dump(), "lr": config.train.lr,
                                "data": sha256_file(Path(data_dir) / "manifest.json")})
    summary = {"final_dir": str(out / "final"), "step": config.train.max_steps, "tokens": 100, "val_loss": 4.0,
               "val_bpb": val_bpb, "train_loss": rows[-2]["loss"], "seconds": 0.01}
    for cb in callbacks:
        cb("end", summary)
    return summary


def evaluate_checkpoint(checkpoint_dir, data_dir, config=None, tasks=("val",), out_file=None):
    CALLS["evaluate"] += 1
    cfgj = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    res = {"checkpoint": str(checkpoint_dir), "tasks": {
        "val": {"val_loss": 4.0, "val_ppl": 54.6, "val_bpb": 1.0 / cfgj["lr"], "unigram_bpb": 5.0}}}
    if "samples" in tasks:
        res["tasks"]["samples"] = [{"seed": 0, "prompt": "def ", "text": "hello():"}]
    if out_file:
        atomic_write_json(out_file, res)
    return res


def format_report(result):
    return "val bpb " + str(result["tasks"]["val"]["val_bpb"])


def finetune(config, base_dir, out_dir, callbacks=()):
    CALLS["finetune"] += 1
    out = Path(out_dir)
    for s in range(1, config.finetune.max_steps + 1):
        for cb in callbacks:
            cb("log", {"step": s, "loss": 3.0 - s / 100, "lr": config.finetune.lr})
    _save_model(out / "final", {"base": sha256_tree(base_dir), "ft_lr": config.finetune.lr})
    atomic_write_text(out / "samples.txt", "a docstring\n")
    return {"adapter_dir": None, "final_dir": str(out / "final"), "task": "instruct", "val_loss_before": 3.0,
            "val_loss_after": 2.0 + config.finetune.lr, "samples": ["a docstring"], "seconds": 0.01}


def model_sha256(directory):
    return sha256_tree(directory)


def install(monkeypatch) -> Counter:
    """Put the stand-ins in place of the gptcore functions the tasks call (attributes of the real modules)."""
    import importlib

    this = sys.modules[__name__]
    names = {
        "gptcore.data.sources": ["download", "read_jsonl_documents"],
        "gptcore.data.sharding": ["prepare_shards"],
        "gptcore.tokenizer": ["train_tokenizer", "load_tokenizer"],
        "gptcore.training.pretrain": ["pretrain"],
        "gptcore.evaluation.evaluate": ["evaluate_checkpoint", "format_report"],
        "gptcore.finetuning.finetune": ["finetune"],
        "gptcore.model.folder": ["model_sha256"],
    }
    for mod, fns in names.items():
        real = importlib.import_module(mod)
        for fn in fns:
            monkeypatch.setattr(real, fn, getattr(this, fn))
    CALLS.clear()
    return CALLS


class _Patch:
    """The two monkeypatch methods `install` uses, for a subprocess without pytest."""

    def setitem(self, d, k, v):
        d[k] = v

    def setattr(self, obj, name, value, raising=True):
        setattr(obj, name, value)


def _faults() -> None:
    """Env hooks for CLI tests: FAKE_FAIL=stage raises a DataError there; FAKE_SLEEP=stage:seconds."""
    import os
    import time

    from gptcore.errors import DataError

    this = sys.modules[__name__]
    fail, sleep = os.environ.get("FAKE_FAIL"), os.environ.get("FAKE_SLEEP")
    for name in ("download", "train_tokenizer", "prepare_shards", "pretrain", "evaluate_checkpoint", "finetune"):
        fn = getattr(this, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            if fail == _name:
                raise DataError("shard file is damaged (bad magic)", "x/train_000.bin", "rerun with --refresh")
            if sleep and sleep.split(":")[0] == _name:
                Path(os.environ["FAKE_SLEEP_FLAG"]).write_text("sleeping")
                time.sleep(float(sleep.split(":")[1]))
            return _fn(*a, **k)

        setattr(this, name, wrapped)


if __name__ == "__main__":  # python tests/pipeline_fakes.py run CONFIG ...  = `gptcore` on the stand-ins
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pipeline_fakes as me  # the module under its import name, so `install` patches that copy

    me._faults()
    me.install(_Patch())
    from gptcore.cli import app

    sys.argv[0] = "gptcore"
    app()
