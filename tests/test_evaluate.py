"""Evaluation: every number checked against transformers' GPT2LMHeadModel holding the same weights,
or against a from-scratch float64 computation."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptcore.errors import DataError
from test_train import make_config  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from gptcore.data.sharding import prepare

    d = tmp_path_factory.mktemp("data")
    prepare(make_config(), d, progress=False)
    return d


@pytest.fixture(scope="module")
def pair(data_dir, tmp_path_factory):
    """(our model, its tokenizer, the same weights in transformers' GPT2LMHeadModel)."""
    from transformers import GPT2LMHeadModel

    from gptcore.convert.hf import save_hf_gpt2
    from gptcore.model.gpt import GPTConfig, build_model
    from gptcore.tokenizer import load_tokenizer

    tok = load_tokenizer(data_dir / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    hf_dir = save_hf_gpt2(model, tmp_path_factory.mktemp("hf") / "gpt2")
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    return model, tok, hf


def hf_logprob(hf, ctx: list[int], cont: list[int], block: int = 32) -> tuple[float, bool]:
    full = (ctx + cont)[-(block + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([full[:-1]])).logits[0].double()
    lp = F.log_softmax(logits, dim=-1)[-len(cont):]
    tgt = torch.tensor(full[-len(cont):])
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def req(*args):
    return SimpleNamespace(args=args)


# ---------------------------------------------------------------------------------------------


def test_val_metrics_match_transformers_loss(pair, data_dir):
    from gptcore.evaluation.evaluate import split_stats, split_tokens, val_metrics

    model, _, hf = pair
    T = 31  # HF sees T+1 tokens (it shifts labels itself), within n_positions=32
    got = val_metrics(model, data_dir, batch_size=4, block_size=T, batches=2)
    toks = split_tokens(data_dir, "val").astype(np.int64)
    windows = torch.tensor(np.stack([toks[i * T: i * T + T + 1] for i in range(8)]))
    with torch.no_grad():
        want = float(hf(windows, labels=windows).loss)
    assert got["val_tokens"] == 8 * T
    assert got["val_loss"] == pytest.approx(want, rel=1e-5)
    ntok, nbytes = split_stats(data_dir, "val")
    assert got["val_bpb"] == pytest.approx(want / math.log(2) * ntok / nbytes, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(want), rel=1e-5)


def test_unigram_bpb_from_scratch(data_dir):
    from gptcore.data.sharding import load_manifest, read_shard
    from gptcore.evaluation.evaluate import unigram_bpb

    man = load_manifest(data_dir)
    train = [int(t) for s in man["splits"]["train"]["shards"] for t in read_shard(data_dir / s["file"])]
    val = [int(t) for s in man["splits"]["val"]["shards"] for t in read_shard(data_dir / s["file"])]
    counts, V, N = Counter(train), man["vocab_size"], len(train)
    bits = -sum(math.log2((counts[t] + 1) / (N + V)) for t in val)  # add-one smoothing
    want = bits / man["splits"]["val"]["bytes"]
    assert unigram_bpb(data_dir) == pytest.approx(want, rel=1e-9)
    assert 1.0 < want < 8.0


def test_loglikelihood_matches_transformers(pair):
    from gptcore.evaluation.lm_eval import LMEvalAdapter

    model, tok, hf = pair
    lm = LMEvalAdapter(model, tok, batch_size=3)
    long_ctx = "def function(argument):\n    return argument * 2 + 1  # " * 4  # > 32 tokens: cut from the left
    reqs = [req("import os\n", "import sys"), req("class A:", " pass"), req("", "hello world"), req(long_ctx, " done")]
    got = lm.loglikelihood(reqs)
    for r, (lp, greedy) in zip(reqs, got):
        ctx = tok.encode_ordinary(r.args[0]) if r.args[0] else [tok.eot_id]
        want_lp, want_greedy = hf_logprob(hf, ctx, tok.encode_ordinary(r.args[1]))
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4) and greedy == want_greedy
    assert len(tok.encode_ordinary(long_ctx)) > 32


def test_loglikelihood_rolling_matches_transformers(pair):
    from gptcore.evaluation.lm_eval import LMEvalAdapter

    model, tok, hf = pair
    lm = LMEvalAdapter(model, tok)
    short, long = "x = 1\n", "for i in range(10):\n    print(i, i * i)\n" * 6
    got = lm.loglikelihood_rolling([req(short), req(long)])
    toks = tok.encode_ordinary(short)
    assert got[0] == pytest.approx(hf_logprob(hf, [tok.eot_id], toks)[0], rel=1e-5)
    toks = tok.encode_ordinary(long)
    assert len(toks) > 64
    want = 0.0
    for i in range(0, len(toks), 32):  # disjoint windows, each after the token before it
        want += hf_logprob(hf, [tok.eot_id] if i == 0 else toks[i - 1:i], toks[i:i + 32])[0]
    assert got[1] == pytest.approx(want, rel=1e-5)


def test_generate_until_matches_transformers_greedy(pair):
    from gptcore.evaluation.lm_eval import LMEvalAdapter

    model, tok, hf = pair
    lm = LMEvalAdapter(model, tok)
    ids = tok.encode_ordinary("def main(")
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    text = tok.decode([t for t in out[0, len(ids):].tolist() if t != tok.eot_id])
    [got] = lm.generate_until([req("def main(", {"until": [], "max_gen_toks": 12})])
    assert got == text
    stop = text[len(text) // 2:][:2]
    if stop:
        [cut] = lm.generate_until([req("def main(", {"until": [stop], "max_gen_toks": 12})])
        assert cut == text[: text.find(stop)]


def test_multiple_choice_accuracy(pair, tmp_path):
    from gptcore.evaluation.evaluate import load_mc_jsonl, multiple_choice

    model, tok, hf = pair
    items = [
        {"context": "import", "endings": ["os", "sys", "re"], "label": 0},
        {"context": "def f(x):\n    return", "endings": ["x", "None"], "label": 1},
        {"context": "for i in", "endings": ["range(3):", "items:", "x"], "label": 2},
        {"context": "class", "endings": ["A:", "Foo(Bar):"], "label": 0},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    got = multiple_choice(model, tok, load_mc_jsonl(path))
    correct = correct_norm = 0
    for it in items:
        ctx = tok.encode_ordinary(it["context"])
        scores = [hf_logprob(hf, ctx, tok.encode_ordinary(" " + e))[0] for e in it["endings"]]
        norm = [s / len((" " + e).encode()) for s, e in zip(scores, it["endings"])]
        correct += int(np.argmax(scores) == it["label"])
        correct_norm += int(np.argmax(norm) == it["label"])
    assert got == {"acc": correct / 4, "acc_norm": correct_norm / 4, "n": 4}

    path.write_text(json.dumps(items[0]) + "\n" + json.dumps({"context": "x", "endings": ["a"], "label": 3}) + "\n")
    with pytest.raises(DataError, match="line 2"):
        load_mc_jsonl(path)


def test_samples_are_reproducible(pair):
    from gptcore.evaluation.evaluate import samples

    model, tok, _ = pair
    a = samples(model, tok, ["def ", "import "], seeds=[0, 1], max_new_tokens=8)
    b = samples(model, tok, ["def ", "import "], seeds=[0, 1], max_new_tokens=8)
    assert a == b and len(a) == 4
    assert a[0]["text"] != a[1]["text"]  # different seeds, different samples


def test_parse_rate_cuts_at_the_last_complete_line_and_dedents():
    from gptcore.evaluation.evaluate import complete_lines, parse_rate, parses

    assert complete_lines("x = 1\ny = (") == "x = 1\n" and complete_lines("def f(") == ""
    good = {"prompt": "def ", "text": "f(x):\n    return x\n    y = (1,"}  # the cut-off last line is dropped
    indented = {"prompt": "    ", "text": "if a:\n        b = 1\n"}  # a body taken out of a class: dedented
    bad = {"prompt": "class ", "text": " A:\nreturn\n"}  # no indented block after the colon
    partial = {"prompt": "import ", "text": "os"}  # no complete line at all: not counted as code
    got = parse_rate([good, indented, bad, partial])
    assert got == {"parse_rate": 0.5, "n": 4}
    # the reference: Python's own compiler decides, on the exact text we cut
    for s, want in [(good, True), (indented, True), (bad, False)]:
        import textwrap

        code = textwrap.dedent(complete_lines(s["prompt"] + s["text"]))
        try:
            compile(code, "<t>", "exec")
            ok = True
        except SyntaxError:
            ok = False
        assert ok is want and parses(complete_lines(s["prompt"] + s["text"])) is want
    assert math.isnan(parse_rate([])["parse_rate"])


def test_hellaswag_offline_is_a_clear_error():
    from gptcore.evaluation.evaluate import hellaswag_items

    with pytest.raises(DataError, match="HellaSwag"):
        hellaswag_items(limit=1)


def test_lm_eval_task_without_the_harness_is_a_clear_error(pair):
    from gptcore.evaluation.lm_eval import _LMBase, run_lm_eval

    if _LMBase is not object:
        pytest.skip("lm-eval is installed here; this checks the message when it is not")
    model, tok, _ = pair
    with pytest.raises(DataError, match="lm-evaluation-harness is not installed"):
        run_lm_eval(model, tok, ["hellaswag"])


def test_evaluate_cli_writes_eval_json(data_dir, tmp_path, run_cli):
    from gptcore.training.pretrain import pretrain

    cfg = make_config(max_steps=150, batch_size=8, lr=1e-2, warmup_steps=10, eval_every=1000, ckpt_every=1000)
    cfg.model.n_embd = 64
    s = pretrain(cfg, data_dir, tmp_path / "run")
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "import", "endings": ["os", "sys"], "label": 0}) + "\n")
    r = run_cli("evaluate", s["final_dir"], "--data", data_dir, "--tasks", "val", "--tasks", f"mc:{mc}", "--tasks", "samples")
    assert r.returncode == 0, r.stderr
    result = json.loads((Path(s["final_dir"]) / "eval.json").read_text())
    val = result["tasks"]["val"]
    assert "bits per byte" in r.stdout and "unigram" in r.stdout
    assert val["val_bpb"] < val["unigram_bpb"]  # the trained model beats token frequencies
    assert result["tasks"][f"mc:{mc}"]["n"] == 1 and len(result["tasks"]["samples"]) == 3
    assert result["tasks"]["code"]["n"] == 3 and 0 <= result["tasks"]["code"]["parse_rate"] <= 1
    assert "parse rate" in r.stdout
    # the previous best model's numbers appear beside this one's
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"tasks": {"val": {"val_loss": 9.0, "val_ppl": 8103.08, "val_bpb": 7.5}}}))
    r = run_cli("evaluate", s["final_dir"], "--data", data_dir, "--previous", prev, "--out", tmp_path / "e2.json")
    assert r.returncode == 0, r.stderr
    assert "7.5000" in r.stdout and (tmp_path / "e2.json").exists()
    r = run_cli("evaluate", s["final_dir"], "--data", data_dir, "--tasks", "nonsense")
    assert r.returncode == 2 and "unknown evaluation task" in r.stderr
