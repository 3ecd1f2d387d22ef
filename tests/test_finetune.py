"""Fine-tuning: datasets, the prompt template and its loss mask, the recipe end to end, resume, bad input."""

import inspect
import json
import textwrap
from collections import Counter

import pytest
import torch

from gptcore.data import sft as sft_data
from gptcore.config import config_from_dict
from gptcore.errors import CheckpointError, DataError
from gptcore.finetuning.finetune import finetune

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# a small pretrained base, made once per module (a few seconds)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-layer GPT (block 192) pre-trained for 40 steps on standard-library code, with its own 384-token BPE."""
    from gptcore.model.folder import save_model
    from gptcore.model.gpt import GPT, GPTConfig
    from gptcore.tokenizer import BPETokenizer

    recs = sft_data.python_docstrings()
    text = "\n\n".join(r["input"] + "\n" + r["output"] for r in recs[::7])
    tok = BPETokenizer.train(text[:60_000], vocab_size=384, progress=False)
    ids = torch.tensor(tok.encode_ordinary(text[:150_000]), dtype=torch.long)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=192, n_layer=2, n_head=2, n_embd=48))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        ix = torch.randint(0, len(ids) - 129, (8,), generator=g)
        x = torch.stack([ids[i: i + 128] for i in ix])
        y = torch.stack([ids[i + 1: i + 129] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("base") / "base"
    save_model(model, tok, path)
    return path


def _cfg(**ft):
    base = {"max_steps": 6, "batch_size": 8, "max_examples": 200, "lr": 1e-2, "warmup_steps": 1, "eval_every": 3,
            "ckpt_every": 3, "log_every": 1, "eval_batches": 3, "num_samples": 2}
    base.update(ft)
    return config_from_dict({"finetune": base, "eval": {"sample_tokens": 12},
                             "train": {"progress": False, "device": "cpu", "num_threads": 1}})


# --------------------------------------------------------------------------------------------
# the template and the loss mask


def test_prompt_template_and_response_only_labels(base):
    from gptcore.tokenizer import load_tokenizer

    tok = load_tokenizer(base / "tokenizer")
    enc = sft_data.Encoder(tok, max_len=200)
    rec = {"instruction": "Summarize.", "input": "def f(x):\n    return x", "output": "Return x unchanged."}
    assert sft_data.format_prompt(rec) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarize.\n\n### Input:\ndef f(x):\n    return x\n\n### Response:\n")
    x, y = enc.instruct(rec)
    prompt = enc.prompt_ids(rec)
    assert tok.decode(prompt) == sft_data.format_prompt(rec)
    assert len(x) == len(y)
    # x is the whole sequence but its last token; y is the next token, -100 wherever it is still prompt
    full = prompt + tok.encode_ordinary(rec["output"]) + [tok.eot_id]
    assert x == full[:-1]
    assert y[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert y[len(prompt) - 1:] == full[len(prompt):]
    assert tok.decode([t for t in y if t != -100]) == "Return x unchanged.<|endoftext|>"

    no_input = enc.prompt_ids({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert "### Input:" not in tok.decode(no_input) and tok.decode(no_input).endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_long_input_is_cut_not_the_template_or_answer(base):
    from gptcore.tokenizer import load_tokenizer

    tok = load_tokenizer(base / "tokenizer")
    enc = sft_data.Encoder(tok, max_len=160)
    rec = {"instruction": "Summarize.", "input": "x = 1\n" * 400, "output": "Sets x many times."}
    x, y = enc.instruct(rec)
    assert len(x) == 160
    answer = [t for t in y if t != -100]
    assert tok.decode(answer) == "Sets x many times.<|endoftext|>"
    assert tok.decode(x).endswith("### Response:\n" + "Sets x many times.")


def test_pad_batch_masks_padding():
    x, y = sft_data.pad_batch([([1, 2, 3], [-100, 5, 6]), ([7], [8])], pad_id=0)
    assert x.tolist() == [[1, 2, 3], [7, 0, 0]]
    assert y.tolist() == [[-100, 5, 6], [8, -100, -100]]
    xc, last, yc = sft_data.pad_classify([[4, 5], [6, 7, 8]], [1, 0], pad_id=9)
    assert xc.tolist() == [[4, 5, 9], [6, 7, 8]] and last.tolist() == [1, 2] and yc.tolist() == [1, 0]


def test_batch_order_is_a_pure_function_and_covers_each_epoch():
    n, bs = 10, 4
    seen = [i for k in range(5) for i in sft_data.batch_indices(n, bs, k, seed=3)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert sft_data.batch_indices(n, bs, 3, seed=3) == seen[12:16]


# --------------------------------------------------------------------------------------------
# datasets


def test_builtin_docstrings_are_real_docstrings_split_deterministically():
    data = sft_data.load_sft("python-docstrings")
    again = sft_data.load_sft("python-docstrings")
    assert data.task == "instruct" and data.train == again.train and data.val == again.val
    assert len(data.train) + len(data.val) + len(data.test) >= 1500 and data.val and data.test
    ids = [{r["id"] for r in s} for s in (data.train, data.val, data.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # the reference: the live functions' docstrings through inspect (safe-to-import modules only)
    import functools
    import importlib

    checked = 0
    for r in data.train + data.val + data.test:
        mod, _, qual = r["id"].partition(".")
        if mod not in ("textwrap", "shlex", "fnmatch", "difflib", "string", "glob", "heapq", "calendar", "fractions"):
            continue
        try:
            obj = functools.reduce(getattr, qual.split("."), importlib.import_module(mod))
        except AttributeError:  # defined inside a function or under a platform branch
            continue
        if not inspect.isfunction(obj):  # replaced by a C version at import (heapq's _heapq)
            continue
        want = " ".join(inspect.getdoc(obj).split("\n\n")[0].split())
        assert " ".join(r["output"].split()) == want, r["id"]
        assert r["input"].lstrip().startswith(("def ", "async def ")) and want not in r["input"]
        checked += 1
    assert checked >= 10


def test_builtin_packages_has_ten_real_classes():
    data = sft_data.load_sft("python-packages")
    assert data.task == "classify" and data.labels == list(sft_data.PACKAGES)
    for r in data.train + data.val + data.test:
        assert r["id"].startswith(r["label"] + "/")
    assert set(Counter(r["label"] for r in data.train)) == set(sft_data.PACKAGES)


def test_local_jsonl_errors_name_the_file_and_line(tmp_path):
    good = {"instruction": "a", "input": "", "output": "b"}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n" + '{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2") as e:
        sft_data.load_sft(str(p))
    assert "line 2" in str(e.value)
    p.write_text(json.dumps(good) + "\n\n" + json.dumps({"instruction": "a", "input": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing the field 'output'.*d\.jsonl:3"):
        sft_data.load_sft(str(p))
    p.write_text(json.dumps(good) + "\n[1, 2]\n")
    with pytest.raises(DataError, match="not an object"):
        sft_data.load_sft(str(p))
    p.write_text(json.dumps({"text": "t", "label": "x"}) + "\n" + json.dumps({"text": "t"}) + "\n")
    with pytest.raises(DataError, match="'label'"):
        sft_data.load_sft(str(p))
    with pytest.raises(DataError, match="not found"):
        sft_data.load_sft(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown dataset file type"):
        sft_data.load_sft(str(tmp_path / "d.csv"))


def test_local_files_load_split_and_detect_the_task(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = sft_data.load_sft(str(p))
    assert data.task == "instruct" and data.val and data.train
    assert len(data.train) + len(data.val) + len(data.test) == 40
    assert all(r["input"] == "" for r in data.train)

    j = tmp_path / "c.json"
    j.write_text(json.dumps({"train": [{"text": "x", "label": 1}, {"text": "y", "label": 0}],
                             "validation": [{"text": "z", "label": 1}]}))
    data = sft_data.load_sft(str(j))
    assert data.task == "classify" and data.labels == ["0", "1"] and [r["label"] for r in data.val] == ["1"]

    tiny = tmp_path / "two.jsonl"
    tiny.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n")
    data = sft_data.load_sft(str(tiny))
    assert len(data.train) == 1 and len(data.val) == 1  # validation is never empty


def test_hf_datasets_source_reads_through_datasets(tmp_path):
    """hf:PATH goes through datasets.load_dataset (a local data folder works offline, like a hub id online)."""
    (tmp_path / "ds").mkdir()
    rows = [{"text": f"def f{i}(): pass", "label": "ab"[i % 2]} for i in range(30)]
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = sft_data.load_sft(f"hf:{tmp_path / 'ds'}")
    assert data.task == "classify" and data.labels == ["a", "b"]
    assert sorted(r["text"] for r in data.train + data.val + data.test) == sorted(r["text"] for r in rows)


# --------------------------------------------------------------------------------------------
# the recipe


def test_lora_finetune_lowers_val_loss_and_writes_its_outputs(base, tmp_path):
    from gptcore.model.folder import load_model, model_sha256
    from gptcore.model.lora import apply_adapter

    events = []
    s = finetune(_cfg(max_steps=20, eval_every=10, ckpt_every=10, log_every=5), base, tmp_path / "ft",
                 callbacks=[lambda e, r: events.append((e, r))])
    assert s["task"] == "instruct" and s["method"] == "lora"
    assert s["val_loss_after"] < s["val_loss_before"] - 0.1, (s["val_loss_before"], s["val_loss_after"])
    assert 0 < s["trainable_params"] < s["total_params"] / 5

    meta = json.loads((tmp_path / "ft" / "adapter" / "adapter.json").read_text())
    assert meta["base_sha256"] == model_sha256(base) and meta["rank"] == 8
    samples = json.loads((tmp_path / "ft" / "samples.json").read_text())
    assert len(samples) == 2 and all(set(x) >= {"instruction", "input", "reference", "generated"} for x in samples)
    assert "### Reference:" in (tmp_path / "ft" / "samples.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 10, 20]
    assert [e for e, _ in events].count("checkpoint") == 2 and events[-1][0] == "end"

    # final/ is the merged model: it computes what base + unmerged adapter computes
    merged, _ = load_model(s["final_dir"])
    plain, _ = load_model(base)
    apply_adapter(plain, s["adapter_dir"], base_dir=base)
    idx = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], plain(idx)[0], rtol=1e-4, atol=1e-4)


def test_resume_after_a_kill_is_bit_exact(base, tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(max_steps=6, ckpt_every=3, eval_every=3)
    finetune(cfg, base, tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_at_3(event, row):
        if event == "checkpoint" and row["step"] == 3:
            raise Killed()

    with pytest.raises(Killed):
        finetune(cfg, base, tmp_path / "b", callbacks=[kill_at_3])
    assert not (tmp_path / "b" / "adapter").exists() and not (tmp_path / "b" / "final").exists()
    s = finetune(cfg, base, tmp_path / "b")
    assert s["resumed_from"] == 3
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(d):
        rows = [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]

    assert losses("a") == losses("b")

    # a resume with different weights-affecting settings is refused, naming the checkpoint
    with pytest.raises(CheckpointError, match="different run"):
        finetune(_cfg(max_steps=6, ckpt_every=3, eval_every=3, rank=4), base, tmp_path / "b")


def test_classification_head_accuracy_and_majority_baseline(base, tmp_path):
    from safetensors.torch import load_file

    s = finetune(_cfg(dataset="python-packages", max_steps=4, max_examples=120), base, tmp_path / "c")
    data = sft_data.load_sft("python-packages", max_examples=120)
    held = data.test or data.val
    conf = s["confusion"]
    assert s["task"] == "classify" and s["labels"] == list(sft_data.PACKAGES)
    assert sum(map(sum, conf)) == len(held)
    assert [sum(row) for row in conf] == [sum(r["label"] == k for r in held) for k in s["labels"]]
    assert s["accuracy"] == pytest.approx(sum(conf[k][k] for k in range(10)) / len(held))
    majority = Counter(r["label"] for r in data.train).most_common(1)[0][0]
    assert s["majority_baseline"] == pytest.approx(sum(r["label"] == majority for r in held) / len(held))
    assert set(load_file(str(tmp_path / "c" / "adapter" / "adapter.safetensors"))) >= {"head.weight", "head.bias"}
    assert json.loads((tmp_path / "c" / "final" / "classifier.json").read_text())["labels"] == s["labels"]
    assert "majority-class baseline" in (tmp_path / "c" / "confusion.txt").read_text()


def test_full_finetuning_trains_every_weight(base, tmp_path):
    from gptcore.model.folder import load_model

    s = finetune(_cfg(method="full", max_steps=2, lr=1e-3, num_samples=0, ckpt_every=2, eval_every=2), base, tmp_path / "f")
    assert s["adapter_dir"] is None and s["trainable_params"] == s["total_params"]
    after, _ = load_model(s["final_dir"])
    before, _ = load_model(base)
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert "transformer.wte.weight" in changed and "transformer.h.0.ln_1.weight" in changed


def test_adapter_on_the_wrong_base_is_refused(base, tmp_path):
    from gptcore.model.folder import load_model, save_model
    from gptcore.model.lora import apply_adapter

    s = finetune(_cfg(max_steps=1, num_samples=0, ckpt_every=1, eval_every=1, eval_batches=1), base, tmp_path / "o")
    other, tok = load_model(base)
    with torch.no_grad():
        other.transformer.wte.weight[0, 0] += 1.0
    save_model(other, tok, tmp_path / "other")
    with pytest.raises(CheckpointError, match="trained on base"):
        apply_adapter(load_model(tmp_path / "other")[0], s["adapter_dir"], base_dir=tmp_path / "other")


# --------------------------------------------------------------------------------------------
# the CLI: one clear line, exit 2, nothing written


def test_cli_bad_input_is_one_line_and_writes_nothing(base, tmp_path, run_cli):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(textwrap.dedent("""\
        finetune: {max_steps: 1, batch_size: 2, max_examples: 8, eval_batches: 1, num_samples: 0}
        train: {progress: false, num_threads: 1}
    """))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    r = run_cli("finetune", cfg, "--base", base, "--out", tmp_path / "out", "--set", f"finetune.dataset={bad}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "bad.jsonl:2" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = run_cli("finetune", cfg, "--base", base, "--out", tmp_path / "out", "--set", "finetune.rank=0")
    assert r.returncode == 2 and "finetune.rank" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("finetune", cfg, "--base", tmp_path / "missing", "--out", tmp_path / "out")
    assert r.returncode == 2 and "checkpoint folder not found" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_finetune_then_generate_with_the_adapter(base, tmp_path, run_cli):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(textwrap.dedent("""\
        finetune: {max_steps: 2, batch_size: 2, max_examples: 8, eval_batches: 1, num_samples: 1}
        train: {progress: false, num_threads: 1}
        eval: {sample_tokens: 4}
    """))
    r = run_cli("finetune", cfg, "--base", base, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and f"adapter: {tmp_path / 'out' / 'adapter'}" in r.stdout
    r = run_cli("generate", base, "--adapter", tmp_path / "out" / "adapter", "-p", "def", "-n", "3", "-t", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def")
    assert json.loads((tmp_path / "out" / "adapter" / "adapter.json").read_text())["prompt_template"] == "alpaca"
    r = run_cli("generate", base, "--adapter", tmp_path / "out" / "adapter", "--instruction", "Add a and b.",
                "--input", "def add(a, b):", "-n", "3", "-t", "0")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(base, tmp_path):
    """A real kill -9 of `gptcore finetune` after its first checkpoint; the rerun ends bit-identical."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    cfg = tmp_path / "ft.yaml"
    cfg.write_text(textwrap.dedent("""\
        finetune: {max_steps: 12, batch_size: 4, max_examples: 60, eval_batches: 1, num_samples: 0,
                   ckpt_every: 2, eval_every: 4, log_every: 1}
        train: {progress: false, num_threads: 1}
    """))
    cmd = [sys.executable, "-m", "gptcore.cli", "finetune", str(cfg), "--base", str(base)]
    subprocess.run(cmd + ["--out", str(tmp_path / "a")], check=True, capture_output=True)
    p = subprocess.Popen(cmd + ["--out", str(tmp_path / "b")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "b" / "checkpoints" / "step_000004").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "b" / "final").exists()
    r = subprocess.run(cmd + ["--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 13))  # no step twice, none missing


def test_gpt2_xl_lora_config_is_valid_and_its_estimate_fits_24gb():
    from pathlib import Path

    from gptcore.config import load_config
    from gptcore.training.plan import memory_estimate
    from gptcore.training.plan import model_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpt2-xl-lora.yaml")
    ft = cfg.finetune
    assert (ft.method, ft.base_dtype, ft.activation_checkpointing) == ("lora", "bfloat16", True)
    gcfg = model_config(cfg)
    assert (gcfg.n_layer, gcfg.n_embd, gcfg.vocab_size) == (48, 1600, 50257)
    est = memory_estimate(cfg, gcfg)
    assert 1.5e9 < est["params"] < 1.6e9 and est["trainable_params"] == 19_660_800
    assert est["weights"] == 2 * est["params"]  # bf16 frozen base
    assert est["total"] < 20 * 2**30  # leaves room for the CUDA context on a 24 GB card
    full = memory_estimate(load_config(Path(__file__).resolve().parents[1] / "configs" / "gpt2-xl-lora.yaml",
                                       ["finetune.method=full", "finetune.base_dtype=float32"]), gcfg)
    assert full["total"] > 24 * 2**30  # why LoRA: full fine-tuning of XL does not fit
