"""Pre-training engine: schedule, accumulation, NaN guard, checkpoints, resume to the bit, DDP."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gptcore.training import checkpoints as C
from gptcore.config import config_from_dict
from gptcore.errors import CheckpointError, GptcoreError
from gptcore.fileio import sha256_file
from gptcore.metrics import MetricsLog, read_metrics

REPO = Path(__file__).resolve().parents[1]

MODEL = {"preset": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
TRAIN = {"max_steps": 24, "batch_size": 4, "num_threads": 1, "log_every": 2, "eval_every": 8,
         "ckpt_every": 4, "eval_batches": 2, "warmup_steps": 4, "lr": 3e-3, "keep_last": 2, "progress": False}


def make_config(**train):
    return config_from_dict({"data": {"max_bytes": 400_000, "val_fraction": 0.1, "num_proc": 1},
                             "tokenizer": {"vocab_size": 384}, "model": dict(MODEL), "train": {**TRAIN, **train}})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from gptcore.data.sharding import prepare

    d = tmp_path_factory.mktemp("data")
    prepare(make_config(), d, progress=False)
    return d


def run(cfg, data_dir, out, callbacks=()):
    from gptcore.training.pretrain import pretrain

    return pretrain(cfg, data_dir, out, callbacks)


# ---------------------------------------------------------------------------------------------
# schedule and one step


def test_schedule_values():
    """lr_at against the closed form, evaluated in float64 by hand."""
    from gptcore.training.optim import lr_at

    lr, mn, W, N = 6e-4, 6e-5, 10, 110
    assert lr_at(0, N, lr, mn, W) == pytest.approx(lr / 10)
    assert lr_at(9, N, lr, mn, W) == pytest.approx(lr)
    assert lr_at(10, N, lr, mn, W) == pytest.approx(lr)  # cosine starts at the top
    assert lr_at(60, N, lr, mn, W) == pytest.approx((lr + mn) / 2)  # halfway through the decay
    assert lr_at(35, N, lr, mn, W) == pytest.approx(mn + 0.5 * (lr - mn) * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, N, lr, mn, W) == pytest.approx(mn)
    assert lr_at(500, N, lr, mn, W) == pytest.approx(mn)  # clamps past the end
    assert lr_at(60, N, lr, None, W) == pytest.approx((lr + lr / 10) / 2)  # min_lr defaults to lr/10


def _tiny_model(seed=0, dtype=None):
    from gptcore.model.gpt import GPTConfig, build_model

    torch.manual_seed(seed)
    return build_model(GPTConfig.preset("tiny", vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16), dtype=dtype)


def test_accumulation_equals_bigger_batch():
    """Two micro-batches of 4 with accumulation == one batch of 8: same loss, same clipped gradient.

    Plain SGD with lr=1 makes each update exactly -grad, so the parameters compare the gradients
    themselves (AdamW's division by √v would blow float32 rounding of near-zero gradients up)."""
    from gptcore.training.pretrain import train_step

    torch.manual_seed(1)
    x = torch.randint(0, 64, (8, 16))
    y = torch.randint(0, 64, (8, 16))
    a, b = _tiny_model(), _tiny_model()
    oa, ob = torch.optim.SGD(a.parameters(), lr=1.0), torch.optim.SGD(b.parameters(), lr=1.0)
    for _ in range(3):
        la, na, _ = train_step(a, oa, [(x[:4], y[:4]), (x[4:], y[4:])], grad_clip=0.5)
        lb, nb, _ = train_step(b, ob, [(x, y)], grad_clip=0.5)
        assert la == pytest.approx(lb, rel=1e-6) and na == pytest.approx(nb, rel=1e-5)
        assert na > 0.5  # clipping was active
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    # and not trivially: half the batch alone gives a different update
    c = _tiny_model()
    train_step(c, torch.optim.SGD(c.parameters(), lr=1.0), [(x[:4], y[:4])], grad_clip=0.5)
    assert not torch.allclose(c.transformer.h[0].attn.c_attn.weight, _tiny_model().transformer.h[0].attn.c_attn.weight)


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing each block in backward (model.gradient_checkpointing) changes memory, not math."""
    from gptcore.training.pretrain import train_step

    torch.manual_seed(2)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    a, b = _tiny_model(), _tiny_model()
    b.gradient_checkpointing = True
    calls = {"a": 0, "b": 0}
    a.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    b.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    la, na, _ = train_step(a, torch.optim.SGD(a.parameters(), lr=1.0), [(x, y)], grad_clip=0.0)
    lb, nb, _ = train_step(b, torch.optim.SGD(b.parameters(), lr=1.0), [(x, y)], grad_clip=0.0)
    assert calls == {"a": 1, "b": 2}  # the block really ran again in backward
    assert la == lb and nb == pytest.approx(na, rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_nan_step_is_skipped():
    from gptcore.training.optim import build_optimizer
    from gptcore.training.pretrain import train_step

    m = _tiny_model()
    opt = build_optimizer(m, lr=1e-2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    before["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    loss, norm, ok = train_step(m, opt, [(x, x)])
    assert not ok and not math.isfinite(norm)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True, rtol=0, atol=0)
    assert all(p.grad is None for p in m.parameters())  # dropped, not applied next step


# ---------------------------------------------------------------------------------------------
# the whole loop


def test_pretrain_writes_metrics_checkpoints_and_final(data_dir, tmp_path):
    from gptcore.model.folder import load_model
    from gptcore.evaluation.evaluate import unigram_bpb

    events = []
    # enough tokens (192 × 16 × 32) that even this 2-layer, 32-wide model clearly beats the unigram
    cfg = make_config(max_steps=192, lr=1e-2, batch_size=16, eval_batches=16, log_every=8, eval_every=32, ckpt_every=16)
    s = run(cfg, data_dir, tmp_path, [lambda e, r: events.append((e, r))])
    assert s["step"] == 192 and s["tokens"] == 192 * 16 * 32
    rows = read_metrics(tmp_path / "metrics.jsonl")
    logs = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in logs] == list(range(8, 193, 8))
    assert set(logs[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"}
    assert [r["step"] for r in evals] == [32, 64, 96, 128, 160, 192]
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.5
    assert evals[-1]["val_bpb"] < unigram_bpb(data_dir)  # learned more than token frequencies
    kinds = [e for e, _ in events]
    assert kinds.count("log") == 24 and kinds.count("eval") == 6 and kinds.count("checkpoint") == 12 and kinds[-1] == "end"
    # keep_last=2 plus the best by val loss (the last evaluated here)
    steps = [st for st, _ in C.list_checkpoints(tmp_path)]
    assert steps[-2:] == [176, 192] and len(steps) <= 3
    state = C.verify_checkpoint(tmp_path / "checkpoints" / "step_000192")
    assert set(state["files"]) == {"config.json", "model.safetensors", "tokenizer/tokenizer.json", "optimizer.pt"}
    assert {"step", "progress", "ranks", "identity"} <= set(state) and {"loader", "rng"} <= set(state["ranks"][0])
    assert state["progress"]["tokens"] == 192 * 16 * 32
    model, tok = load_model(s["final_dir"])
    assert tok.vocab_size == model.config.vocab_size == 384
    assert s["val_loss"] == evals[-1]["val_loss"]


def test_config_hash_refusal_and_extension(data_dir, tmp_path):
    run(make_config(max_steps=8), data_dir, tmp_path)
    with pytest.raises(CheckpointError, match=r"train\.lr"):
        run(make_config(max_steps=8, lr=1e-3), data_dir, tmp_path)
    s = run(make_config(max_steps=12), data_dir, tmp_path)  # only max_steps changed: extends the run
    assert s["step"] == 12
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_corrupt_checkpoint_is_skipped(data_dir, tmp_path):
    ref = run(make_config(max_steps=12), data_dir, tmp_path / "ref")
    out = tmp_path / "run"
    run(make_config(max_steps=12, keep_last=5), data_dir, out)
    newest = out / "checkpoints" / "step_000012" / "optimizer.pt"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        C.verify_checkpoint(newest.parent)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint.*step_000012"):
        found = C.latest_intact(out)
    assert found[0].name == "step_000008"
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        s = run(make_config(max_steps=12, keep_last=5), data_dir, out)  # redoes steps 9..12 from step 8
    assert s["train_loss"] == ref["train_loss"]
    assert sha256_file(Path(s["final_dir"]) / "model.safetensors") == sha256_file(Path(ref["final_dir"]) / "model.safetensors")


def test_nan_guard_stops_after_max_bad_steps(data_dir, tmp_path, monkeypatch):
    """From step 7 on every loss is NaN: steps are skipped, then the run stops; checkpoints survive."""
    import gptcore.training.pretrain as T

    real = T._build_model

    def poisoned(gcfg, device):
        m = real(gcfg, device)
        forward, calls = m.forward, {"n": 0}

        def fwd(idx, targets=None, **kw):
            logits, loss = forward(idx, targets, **kw)
            if targets is not None and m.training:
                calls["n"] += 1
                if calls["n"] > 6:
                    loss = loss * float("nan")
            return logits, loss

        m.forward = fwd
        return m

    monkeypatch.setattr(T, "_build_model", poisoned)
    with pytest.warns(UserWarning, match="not finite"), pytest.raises(GptcoreError, match="2 steps in a row"):
        run(make_config(max_steps=24, max_bad_steps=2), data_dir, tmp_path)
    assert [st for st, _ in C.list_checkpoints(tmp_path)] == [4]  # step 8 was never reached: no bad checkpoint
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r and r["step"] <= 6)


def test_metrics_log_resume_truncation(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 2, "val_loss": 1.4}\n'
                 '{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    with MetricsLog(p, resume_step=2) as log:
        log.write({"step": 3, "loss": 1.25})
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 2, 3]
    assert read_metrics(p)[-1]["loss"] == 1.25
    with MetricsLog(p, resume_step=None) as log:  # a fresh run starts a fresh file
        log.write({"step": 1, "loss": 9.0})
    assert read_metrics(p) == [{"step": 1, "loss": 9.0}]


# ---------------------------------------------------------------------------------------------
# kill -9 at any moment, then the same command again


def _write_yaml(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("kill_at", ["after_first_checkpoint", "mid_run"])
def test_resume_after_sigkill_is_bit_identical(data_dir, tmp_path, run_cli, kill_at):
    cfg = make_config(max_steps=40, ckpt_every=6, eval_every=10)
    ref = run(cfg, data_dir, tmp_path / "ref")
    cfg_file = _write_yaml(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "killed"
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gptcore.cli", "pretrain", str(cfg_file), "--data", str(data_dir), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def reached() -> bool:
        if kill_at == "after_first_checkpoint":
            return (out / "checkpoints" / "step_000006").exists()
        # between checkpoints: step 20 logged (after checkpoint 18, before 24), the run mid-step
        return any(r["step"] >= 20 for r in read_metrics(out / "metrics.jsonl"))

    deadline = time.time() + 120
    while not reached() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    done = [st for st, _ in C.list_checkpoints(out)]
    assert done and done[-1] < 40
    r = run_cli("pretrain", cfg_file, "--data", data_dir, "--out", out, env={"GPTCORE_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr
    final = C.read_state(out / "checkpoints" / "step_000040")
    assert final["progress"]["train_loss"] == ref["train_loss"]  # bit for bit: == on floats
    assert sha256_file(out / "final" / "model.safetensors") == sha256_file(Path(ref["final_dir"]) / "model.safetensors")
    # the log shows every step once, with the uninterrupted run's losses
    got = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]
    want = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert got == want


def test_muon_trains_hidden_matrices_and_resumes_to_the_bit(data_dir, tmp_path):
    """train.optimizer=muon: torch.optim.Muon holds exactly the blocks' 2-D weights, AdamW the rest,
    and a run resumed from a checkpoint ends bit-identical to an uninterrupted one."""
    import shutil

    from gptcore.model.gpt import GPTConfig, build_model
    from gptcore.training.optim import build_optimizer

    model = build_model(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False))
    muon, adamw = build_optimizer(model, lr=1e-2, kind="muon")
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    by_id = {id(p): n for n, p in model.named_parameters()}
    in_muon = {by_id[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {by_id[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("transformer.h.")}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "transformer.ln_f.weight"} <= in_adamw
    assert in_muon.isdisjoint(in_adamw) and len(in_muon | in_adamw) == len(list(model.parameters()))

    cfg = make_config(max_steps=12, optimizer="muon", keep_last=5)
    ref = run(cfg, data_dir, tmp_path / "ref")
    out = tmp_path / "run"
    run(cfg, data_dir, out)
    shutil.rmtree(out / "checkpoints" / "step_000012")
    shutil.rmtree(out / "final")
    s = run(cfg, data_dir, out)  # resumes from step 8: Muon's momentum and AdamW's moments restored
    assert s["resumed_from_step"] == 8 and s["train_loss"] == ref["train_loss"]
    assert sha256_file(Path(s["final_dir"]) / "model.safetensors") == sha256_file(Path(ref["final_dir"]) / "model.safetensors")
    adam_run = run(make_config(max_steps=12), data_dir, tmp_path / "adamw")
    assert adam_run["train_loss"] != ref["train_loss"]  # the optimizer setting did change the run


def test_stale_temp_folder_and_torn_metrics_line_are_ignored(data_dir, tmp_path):
    ref = run(make_config(max_steps=8), data_dir, tmp_path / "ref")
    out = tmp_path / "run"
    run(make_config(max_steps=4), data_dir, out)
    stale = out / "checkpoints" / ".step_000008.abc123.tmp"  # what a kill during a checkpoint write leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')
    s = run(make_config(max_steps=8), data_dir, out)
    assert not stale.exists()
    assert s["train_loss"] == ref["train_loss"]
    losses = [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_pretrain_and_errors(data_dir, tmp_path, run_cli):
    cfg_file = _write_yaml(make_config(max_steps=4), tmp_path / "cfg.yaml")
    r = run_cli("pretrain", cfg_file, "--data", data_dir, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "val bpb" in r.stdout and (tmp_path / "out" / "final" / "model.safetensors").exists()
    r = run_cli("pretrain", cfg_file, "--data", tmp_path / "nowhere", "--out", tmp_path / "out2")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "gptcore prepare" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("pretrain", cfg_file, "--data", data_dir, "--out", tmp_path / "out", "--set", "train.lr=0.5")
    assert r.returncode == 2 and "different run" in r.stderr and "train.lr" in r.stderr


def test_cpu_adamw_is_fused_and_equals_torch_reference_adamw():
    """build_optimizer takes torch's fused AdamW on CPU; its steps equal torch's plain for-loop AdamW."""
    from gptcore.training.optim import build_optimizer

    a, b = _tiny_model(), _tiny_model()
    b.load_state_dict(a.state_dict())
    oa = build_optimizer(a, lr=1e-2)
    assert oa.defaults["fused"] is True
    decay = [p for p in b.parameters() if p.dim() >= 2]
    rest = [p for p in b.parameters() if p.dim() < 2]
    ob = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                           lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    for step in range(5):  # the same gradients for both (the model's own: near-zero ones included)
        x = torch.randint(0, 64, (2, 16))
        a(x, x)[1].backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.grad = pa.grad.clone()
        oa.step(), ob.step()
        oa.zero_grad(set_to_none=True), ob.zero_grad(set_to_none=True)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)
            pb.data.copy_(pa.data)  # the next gradients are a's: keep b's weights equal, test the step alone


def test_compile_auto_is_on_for_cuda_only():
    from gptcore.training.devices import compile_by_default

    assert compile_by_default(torch.device("cuda"), 10)
    assert not compile_by_default(torch.device("cpu"), 10**6)


@pytest.mark.slow
def test_compiled_training_gives_eager_losses():
    """torch.compile (inductor on CPU) of the model: the same losses as eager, step by step, to float32 tolerance."""
    from gptcore.training.optim import build_optimizer

    eager, comp = _tiny_model(), _tiny_model()
    comp.load_state_dict(eager.state_dict())
    comp.compile()
    x = torch.randint(0, 64, (4, 16))
    y = torch.roll(x, -1, 1)
    losses = {}
    for name, m in (("eager", eager), ("compiled", comp)):
        opt = build_optimizer(m, lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = m(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]  # it trains
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)
