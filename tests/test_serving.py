"""Using the model: the fine-tuning template in `Session`, `gptcore chat`, and `gptcore serve`
against a real server on a free loopback port (plain HTTP, OpenAI's wire format)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest
from servers import free_port, wait_until_up
import torch

from gptcore.data.sft import Encoder

torch.set_num_threads(1)
TEXT = "def add(a, b):\n    return a + b  # sum\n" * 30 + "Return the sum of a and b. Hello world.\n"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A small model folder that says it was instruction-tuned with the alpaca template."""
    from gptcore.fileio import atomic_write_json
    from gptcore.model.folder import save_model
    from gptcore.model.gpt import GPTConfig, build_model
    from gptcore.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT, vocab_size=320)
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=320, n_layer=2, n_head=2, n_embd=32)).eval()
    out = save_model(model, tok, tmp_path_factory.mktemp("m") / "final")
    atomic_write_json(out / "finetune.json", {"task": "instruct", "prompt_template": "alpaca"})
    return out


def greedy(folder, ids, n):
    """Reference: the ids fine-tuning trained on, greedy decoding, cut at <|endoftext|>."""
    from gptcore.model.folder import load_model

    model, tok = load_model(folder)
    new = model.generate(torch.tensor([ids]), n, temperature=0, eos_id=tok.eot_id)[0, len(ids):].tolist()
    return tok.decode(new[: new.index(tok.eot_id)] if tok.eot_id in new else new)


def test_session_applies_the_fine_tuning_template(tuned):
    from gptcore.serving import Session

    s = Session(tuned)
    assert s.template == "alpaca"
    enc = Encoder(s.tokenizer, s.block_size)
    prompt = enc.prompt_ids({"instruction": "Return the sum of a and b.", "input": ""})
    assert s.prompt_ids("Return the sum of a and b.") == prompt
    assert s.complete("Return the sum of a and b.", max_new_tokens=12) == greedy(tuned, prompt, 12)
    # a second turn sees the first one as a finished training example: prompt + reply + <|endoftext|>
    two = s.chat_ids([("hi", "hello")], "Return the sum of a and b.")
    first = enc.prompt_ids({"instruction": "hi", "input": ""}) + s.tokenizer.encode("hello") + [s.tokenizer.eot_id]
    assert two == first + prompt
    raw = Session(tuned, template="none")
    assert raw.prompt_ids("def add(") == raw.tokenizer.encode("def add(")


def test_stream_cuts_at_stop_strings(tuned):
    from gptcore.serving import Reply, Session

    s = Session(tuned, template="none")
    ids = s.prompt_ids("def add(")
    full = "".join(s.stream(ids, 20))
    stop = full[5:7]
    assert stop and full.find(stop) > 0
    reply = Reply()
    pieces = list(s.stream(ids, 20, stop=[stop], reply=reply))
    assert "".join(pieces) == reply.text == full[: full.find(stop)] and reply.finish_reason == "stop"


def test_chat_cli_template_reset_and_temperature(tuned, run_cli):
    from gptcore.serving import Session

    r = subprocess.run([sys.executable, "-m", "gptcore.cli", "chat", str(tuned), "-n", "12"],
                       input="/temp 0\nReturn the sum of a and b.\n/reset\n/temp x\nhi\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = Session(tuned)
    want = s.complete("Return the sum of a and b.", max_new_tokens=12)
    assert "(temperature 0.0)" in r.stdout and "(conversation reset)" in r.stdout and "usage: /temp" in r.stdout
    assert f"model> {want}\n" in r.stdout
    assert f"model> {s.complete('hi', max_new_tokens=12)}\n" in r.stdout  # after /reset: no earlier turn


def _post(url, body, stream=False):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        if not stream:
            return json.loads(resp.read())
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [ln[len("data: "):] for ln in resp.read().decode().split("\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture
def server(tuned):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptcore.cli", "serve", str(tuned), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base + "/health", proc)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_serve_openai_endpoints_on_a_real_server(tuned, server):
    from gptcore.model.folder import load_model
    from gptcore.serving import Session

    _, tok = load_model(tuned)
    raw = greedy(tuned, tok.encode("def add("), 12)
    r = _post(server + "/v1/completions", {"model": "x", "prompt": "def add(", "max_tokens": 12, "temperature": 0})
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == raw
    assert r["usage"]["prompt_tokens"] == len(tok.encode("def add(")) and r["choices"][0]["finish_reason"] in ("stop", "length")
    chunks = _post(server + "/v1/completions", {"prompt": "def add(", "max_tokens": 12, "temperature": 0, "stream": True}, True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == raw and chunks[-1]["choices"][0]["finish_reason"]

    want = Session(tuned).complete("Return the sum of a and b.", max_new_tokens=12)
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Return the sum of a and b."}],
            "max_tokens": 12, "temperature": 0}
    r = _post(server + "/v1/chat/completions", body)
    assert r["object"] == "chat.completion" and r["choices"][0]["message"] == {"role": "assistant", "content": want}
    chunks = _post(server + "/v1/chat/completions", {**body, "stream": True}, True)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(server + "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]})
    assert e.value.code == 400 and "last message" in json.loads(e.value.read())["error"]["message"]
    models = json.loads(urllib.request.urlopen(server + "/v1/models").read())
    assert models["data"][0]["id"] == "final"





def test_generate_instruction_goes_through_the_template(tuned, run_cli, tmp_path):
    """`gptcore generate --instruction/--input` answers the Alpaca prompt fine-tuning trained on, and a
    prompt is accepted positionally as well as with --prompt."""
    from gptcore.data.sft import format_prompt
    from gptcore.model.folder import load_model
    from gptcore.serving.session import instruction_ids, prompt_template

    record = {"instruction": "Return the sum of a and b.", "input": "def add(a, b):\n    return a + b"}
    model, tok = load_model(tuned)
    ids = instruction_ids(tok, model.config.block_size, record["instruction"], record["input"], tuned, room=12)
    text = tok.decode(ids)
    assert text == format_prompt(record)  # the template, with its trailing newline after '### Response:'
    assert text.startswith("Below is an instruction that describes a task.") and text.endswith(
        "### Input:\ndef add(a, b):\n    return a + b\n\n### Response:\n")
    r = run_cli("generate", tuned, "--instruction", record["instruction"], "--input", record["input"], "-t", "0", "-n", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy(tuned, ids, 12) + "\n"

    by_arg = run_cli("generate", tuned, "def add(", "-n", "6", "--seed", "3")
    by_opt = run_cli("generate", tuned, "--prompt", "def add(", "-n", "6", "--seed", "3")
    assert by_arg.returncode == 0 and by_arg.stdout == by_opt.stdout and by_arg.stdout.startswith("def add(")
    for args in (("x", "--prompt", "y"), ("--input", "x"), ("x", "--instruction", "y")):
        bad = run_cli("generate", tuned, *args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr, args

    # a folder that records no template (a pre-trained model) gets the default one, alpaca
    plain = tmp_path / "plain"
    plain.mkdir()
    assert prompt_template(plain) == "alpaca" and prompt_template(tuned) == "alpaca"
