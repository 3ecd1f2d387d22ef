"""The registry holds real MLflow models: `mlflow.pyfunc.load_model("models:/NAME@champion")`
predicts, and `mlflow models serve` answers /invocations (checked with MLflow's own loaders)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from servers import free_port, wait_until_up
import torch

torch.set_num_threads(1)
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fine-tuned-looking folder (alpaca template) logged, registered and promoted in a fresh sqlite store."""
    from gptcore.fileio import atomic_write_json
    from gptcore.model.folder import model_sha256, save_model
    from gptcore.model.gpt import GPTConfig, build_model
    from gptcore.tokenizer import BPETokenizer
    from tasks import tracking

    root = tmp_path_factory.mktemp("reg")
    tok = BPETokenizer.train("def add(a, b):\n    return a + b\n" * 30 + "Return the sum.", vocab_size=300)
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16)).eval()
    folder = save_model(model, tok, root / "final")
    atomic_write_json(folder / "finetune.json", {"task": "instruct", "prompt_template": "alpaca"})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = tracking.client(uri)
    run_id = tracking.start_run(c, tracking.experiment_id(c, "t"), "finetune")
    model_id = tracking.log_pyfunc_model(c, run_id, folder)
    sha = model_sha256(folder)
    version, new = tracking.register_version(c, "gptcore-finetuned", model_id, run_id, sha, "val_loss_after", 1.5)
    promoted, _ = tracking.promotion_gate(c, "gptcore-finetuned", version, "val_loss_after", 1.5)
    assert new and promoted
    return uri, folder, c, model_id


def test_pyfunc_loads_from_the_registry_and_applies_the_template(registry, monkeypatch):
    import mlflow

    from gptcore.serving import Session

    uri, folder, c, model_id = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mv = c.get_model_version_by_alias("gptcore-finetuned", "champion")
    assert mv.tags["model_id"] == model_id and mv.source == c.get_logged_model(model_id).artifact_location
    m = mlflow.pyfunc.load_model("models:/gptcore-finetuned@champion")
    sig = m.metadata.signature
    assert [p.name for p in sig.params] == ["max_new_tokens", "temperature", "top_k"]
    assert sig.inputs.input_types() and m.metadata.flavors["python_function"]
    s = Session(folder)
    got = m.predict([PROMPT])
    assert got == [s.complete(PROMPT, 64, 0.0)] and got[0]  # greedy, through the alpaca template
    assert m.predict([PROMPT, "Return the sum."], params={"max_new_tokens": 5}) == [
        s.complete(PROMPT, 5, 0.0), s.complete("Return the sum.", 5, 0.0)]
    reqs = Path(mlflow.pyfunc.get_model_dependencies("models:/gptcore-finetuned@champion")).read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs


def test_same_weights_are_not_registered_twice(registry):
    from gptcore.model.folder import model_sha256
    from tasks import tracking

    _, folder, c, model_id = registry
    version, new = tracking.register_version(c, "gptcore-finetuned", model_id, "x", model_sha256(folder), "val_loss_after", 1.5)
    assert (version, new) == ("1", False)


@pytest.mark.slow  # mlflow models serve starts uvicorn and loads the model (~20-60 s on 2 busy cores)
def test_mlflow_models_serve_answers_invocations(registry, tmp_path):
    from gptcore.serving import Session

    uri, folder, _, _ = registry
    port = free_port()
    # as with an activated venv: the server runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/gptcore-finetuned@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base + "/ping", proc)
        body = {"inputs": [PROMPT], "params": {"max_new_tokens": 12}}
        req = urllib.request.Request(base + "/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert out == {"predictions": [Session(folder).complete(PROMPT, 12, 0.0)]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker: a session of their own
        proc.wait(timeout=60)
