"""Evaluation: every number checked against transformers' GPT2LMHeadModel holding the same weights,
or against a from-scratch float64 computation."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptcore.errors import DataError
from test_train import make_config  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]


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
    hf_dir = save_hf_gpt2(model, tmp_path_factory.mktemp("hf") / "gpt2", tokenizer=tok)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    return model, tok, hf


def hf_logprob(hf, ctx: list[int], cont: list[int], block: int = 32) -> tuple[float, bool]:
    full = (ctx + cont)[-(block + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([full[:-1]])).logits[0].double()
    lp = F.log_softmax(logits, dim=-1)[-len(cont):]
    tgt = torch.tensor(full[-len(cont):])
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


# ---------------------------------------------------------------------------------------------


def test_val_metrics_match_transformers_loss(pair, data_dir):
    from gptcore.evaluation.evaluate import split_stats, val_metrics

    model, _, hf = pair
    T = 31  # HF sees T+1 tokens (it shifts labels itself), within n_positions=32
    got = val_metrics(model, data_dir, batch_size=4, block_size=T, batches=2)
    m = json.loads((data_dir / "manifest.json").read_text())  # the val stream read with numpy alone
    toks = np.concatenate([np.fromfile(data_dir / s["file"], dtype="<u2", offset=1024)
                           for s in m["splits"]["val"]["shards"]]).astype(np.int64)
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


# ---------------------------------------------------------------------------------------------
# the lm-eval adapter against lm-eval itself: its window functions, and its `hf` model (HFLM) on the
# exported Hugging Face folder of the same weights


@pytest.fixture(scope="module")
def hflm(pair):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    model, tok, hf = pair
    return HFLM(pretrained=hf, tokenizer=str(hf.name_or_path), backend="causal", device="cpu", batch_size=3)


def instances(kind, *args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 65, 100])
def test_rolling_windows_equal_lm_eval(n):
    lm_utils = pytest.importorskip("lm_eval.utils")
    from gptcore.evaluation.lm_eval import rolling_windows

    toks = list(range(1, n + 1))
    want = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(toks, 0, 32, 1)]
    assert list(rolling_windows(toks, 0, 32)) == want


def test_loglikelihood_equals_hflm(pair, hflm):
    from gptcore.evaluation.lm_eval import LMEvalAdapter

    model, tok, _ = pair
    long_ctx = "def function(argument):\n    return argument * 2 + 1  # " * 4  # > 32 tokens: cut from the left
    assert len(tok.encode_ordinary(long_ctx)) > 32
    reqs = instances("loglikelihood",
                     ("Question: is it true?\nAnswer: ", "yes"),  # trailing space: moved into the continuation
                     ("Question: is it true?\nAnswer: ", "no"),
                     ("Question: is it true?\nAnswer:", " yes"),  # the same text without the move
                     ("import os\n", "import sys"), ("class A:", " pass"), ("x =  \n\t", "1"),
                     ("", "hello world"), ("", "<|endoftext|>def"), (long_ctx, " done"))
    want = hflm.loglikelihood(reqs)
    got = LMEvalAdapter(model, tok, batch_size=2).loglikelihood(reqs)
    for (lp, greedy), (want_lp, want_greedy) in zip(got, want):
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    assert got[0] == pytest.approx(got[2])  # after the move both spell the same pair


def test_loglikelihood_rolling_equals_hflm(pair, hflm):
    from gptcore.evaluation.lm_eval import LMEvalAdapter

    model, tok, _ = pair
    # not periodic: on a repeating text HFLM's one-token-continuation cache mixes up two windows that
    # spell the same tokens split at different points (it gathers the leading positions, not the trailing)
    docs = ["x = 1\n", "".join(f"for i{k} in range({k * k}):\n    print(i{k}, {k} * i)\n" for k in range(12)),
            "".join(f"def f{k}(a, b):\n    return a - {k ** 3} * b\n" for k in range(15))]
    assert all(len(tok.encode_ordinary(d)) > 64 and len(tok.encode_ordinary(d)) % 32 for d in docs[1:])
    reqs = instances("loglikelihood_rolling", *[(d,) for d in docs])
    want = hflm.loglikelihood_rolling(reqs)
    got = LMEvalAdapter(model, tok).loglikelihood_rolling(reqs)
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_equals_hflm(pair, hflm):
    from gptcore.evaluation.lm_eval import LMEvalAdapter

    model, tok, _ = pair
    lm = LMEvalAdapter(model, tok)
    long_ctx = "def function(argument):\n    return argument * 2 + 1  # " * 3  # > 32 - 12: left-truncated
    reqs = instances("generate_until",
                     ("def main(", {"until": [], "max_gen_toks": 12}),
                     ("def main(", {"until": ["(", "e"], "max_gen_toks": 12}),
                     ("import", {"until": "\n", "max_gen_toks": 20, "do_sample": False, "temperature": 0.7}),
                     (long_ctx, {"until": ["\n\n"], "max_gen_toks": 12}))
    want = hflm.generate_until(reqs)
    assert lm.generate_until(reqs) == want
    assert len(set(want)) > 1  # the cases differ, so each one checks something
    with pytest.raises(DataError, match="max_gen_toks"):  # lm-eval's 256 default cannot fit a 32-token block
        lm.generate_until(instances("generate_until", ("def", {"until": []})))


def test_generate_until_samples_when_asked(pair):
    from gptcore.evaluation.lm_eval import LMEvalAdapter

    model, tok, _ = pair
    lm = LMEvalAdapter(model, tok)
    reqs = instances("generate_until", *[("def", {"until": [], "max_gen_toks": 16, "temperature": 1.5})] * 4)
    torch.manual_seed(0)
    assert len(set(lm.generate_until(reqs))) > 1  # temperature > 0 turns sampling on, as lm-eval


MC_DOCS = [{"q": q, "choices": c, "gold": g, "doc": "".join(f"{q} {k} ** 3 == {k ** 3}\n" for k in range(9))}
           for q, c, g in [
    ("def add(a, b):\n    return", [" a + b", " a - b", " None"], 0),
    ("import", [" os", " sys", "ant"], 1),
    ("for i in", [" range(10):", " list:", " 3"], 0),
    ("class Foo", ["(object):", ":", " bar"], 1),
    ("x = [1, 2,", [" 3]", " 4]", "5]"], 2),
]]
LM_TASKS = {
    "gptcore_mc_space": dict(output_type="multiple_choice", doc_to_text="{{q}} ", target_delimiter="",
                             doc_to_choice="{{choices}}", doc_to_target="{{gold}}",
                             metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
    "gptcore_mc_delim": dict(output_type="multiple_choice", doc_to_text="{{q}}", target_delimiter=" ",
                             doc_to_choice="{{choices}}", doc_to_target="{{gold}}",
                             metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
    "gptcore_rolling": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{doc}}",
                            metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]),
    "gptcore_gen": dict(output_type="generate_until", doc_to_text="{{q}}", doc_to_target="{{choices[gold]}}",
                        generation_kwargs={"until": ["\n"], "max_gen_toks": 8},
                        metric_list=[{"metric": "exact_match"}]),
}


def write_lm_tasks(folder: Path) -> list[Path]:
    import yaml

    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    paths = []
    for name, spec in LM_TASKS.items():
        p = folder / f"{name}.yaml"
        p.write_text(yaml.safe_dump({"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                                     "test_split": "test", **spec}))
        paths.append(p)
    return paths


@pytest.mark.slow  # ~50 s: two whole simple_evaluate runs
def test_run_lm_eval_equals_hflm_on_local_tasks(pair, hflm, tmp_path):
    """Whole lm-eval tasks (multiple choice with and without a trailing-space context, rolling
    perplexity on documents longer than the block, generation): the same numbers as lm-eval's hf model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gptcore.evaluation.lm_eval import run_lm_eval

    model, tok, _ = pair
    paths = write_lm_tasks(tmp_path)
    assert all(len(tok.encode_ordinary(d["doc"])) > 64 for d in MC_DOCS)
    got = run_lm_eval(model, tok, [str(p) for p in paths])
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    want = lm_eval.simple_evaluate(model=hflm, tasks=list(LM_TASKS), task_manager=manager)
    assert set(got) == set(LM_TASKS)
    for name in LM_TASKS:
        w = {k: v for k, v in want["results"][name].items() if isinstance(v, float)}
        assert w and {k: got[name][k] for k in w} == pytest.approx(w, rel=1e-5, abs=1e-6), name


@pytest.mark.slow  # lm-eval indexes its ~10k task files (~20 s) to know every name
def test_lm_eval_unknown_task_is_a_clear_error(pair):
    pytest.importorskip("lm_eval")
    from gptcore.evaluation.lm_eval import run_lm_eval

    model, tok, _ = pair
    with pytest.raises(DataError, match="unknown lm-eval task 'hellaswagg'.*hellaswag"):
        run_lm_eval(model, tok, ["hellaswagg"])


def test_format_report_shows_lm_eval_results():
    from gptcore.evaluation.evaluate import format_report

    res = {"checkpoint": "m", "params": 1e6, "tasks": {"lm-eval:x": {
        "x": {"acc,none": 0.4, "acc_stderr,none": 0.1, "alias": "x"},
        "y": {"word_perplexity,none": 12.5, "bits_per_byte,none": 1.25}}}}
    text = format_report(res)
    assert "lm-eval x  acc 0.4000 ± 0.1000" in text
    assert "lm-eval y  word_perplexity 12.5000  bits_per_byte 1.2500" in text


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
    assert result["tasks"][f"mc:{mc}"]["n"] == 1 and len(result["tasks"]["samples"]) == 3 * 8  # prompts × seeds
    assert result["tasks"]["code"]["n"] == 24 and 0 <= result["tasks"]["code"]["parse_rate"] <= 1
    assert "parse rate" in r.stdout
    greedy = result["tasks"]["greedy"]  # beside the sampled ones, in the report too
    assert [g["prompt"] for g in greedy] == ["import os\n", "def main():\n", "class Config:\n"]
    assert len({g["text"] for g in greedy}) == 3
    lines = r.stdout.splitlines()
    at = lines.index(next(x for x in lines if x.startswith("greedy") and "'def main():\\n'" in x))
    assert [x.split()[1] for x in lines[at + 1:at + 9]] == [f"seed={k}" for k in range(8)]
    assert all("'def main():\\n'" in x for x in lines[at:at + 9])
    assert result["sampling"] == {"temperature": 0.8, "top_k": 50, "repetition_penalty": 1.1, "no_repeat_ngram_size": 4,
                                  "tokens": 48}
    # one default: the CLI without --config measures what the pipeline (configs/tiny.yaml) measures
    from gptcore.config import load_config
    from gptcore.evaluation.evaluate import evaluate_checkpoint

    pipeline = evaluate_checkpoint(s["final_dir"], data_dir, config=load_config(REPO / "configs" / "tiny.yaml"))
    assert pipeline["tasks"]["val"] == val
    # the previous best model's numbers appear beside this one's
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"tasks": {"val": {"val_loss": 9.0, "val_ppl": 8103.08, "val_bpb": 7.5}}}))
    r = run_cli("evaluate", s["final_dir"], "--data", data_dir, "--previous", prev, "--out", tmp_path / "e2.json")
    assert r.returncode == 0, r.stderr
    assert "7.5000" in r.stdout and (tmp_path / "e2.json").exists()
    r = run_cli("evaluate", s["final_dir"], "--data", data_dir, "--tasks", "nonsense")
    assert r.returncode == 2 and "unknown evaluation task" in r.stderr
