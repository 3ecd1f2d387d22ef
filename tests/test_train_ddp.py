"""Data-parallel pre-training on CPU: `torchrun --nproc_per_node 2` with gloo, compared with one process.

Two ranks with micro-batch B see, between them, exactly the windows one process with batch 2B sees
(the loader deals window i of each epoch's order to rank i mod 2), so the losses must match the
single-process run and both replicas must hold identical weights after every all-reduced step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gptcore.metrics import read_metrics

from test_train import make_config  # noqa: E402  (tests/ is on sys.path under pytest)

DRIVER = '''
import os, sys, torch
import gptcore.training.pretrain as T
from gptcore.config import load_config
kept = {}
real = T._build_model
def build(gcfg, device):
    kept["m"] = real(gcfg, device)
    return kept["m"]
T._build_model = build
summary = T.pretrain(load_config(sys.argv[1]), sys.argv[2], sys.argv[3])
if all(type(v) is torch.Tensor for v in kept["m"].state_dict().values()):
    torch.save({k: v.detach().clone() for k, v in kept["m"].state_dict().items()},
               os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.pt"))
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from gptcore.data.sharding import prepare

    d = tmp_path_factory.mktemp("data")
    prepare(make_config(), d, progress=False)
    return d


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_data_parallel_gloo_matches_single_process(data_dir, tmp_path, mode):
    """DDP: replicas identical. FSDP2 (fully_shard, one sharded copy): final/ holds the gathered weights."""
    from gptcore.model.folder import load_model
    from gptcore.training.pretrain import pretrain

    steps = 10
    single = pretrain(make_config(max_steps=steps, batch_size=8, ckpt_every=5), data_dir, tmp_path / "single")

    cfg = make_config(max_steps=steps, batch_size=4, ckpt_every=5, fsdp=mode == "fsdp")  # 2 ranks × 4 = the same global batch
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "ddp"
    out.mkdir()
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(driver), str(cfg_file), str(data_dir), str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    m_single, _ = load_model(single["final_dir"])
    m_par, _ = load_model(out / "final")
    if mode == "ddp":
        r0 = torch.load(out / "rank0.pt", weights_only=True)
        r1 = torch.load(out / "rank1.pt", weights_only=True)
        for k in r0:  # replicas identical, bit for bit
            assert torch.equal(r0[k], r1[k]), k
            assert torch.equal(r0[k], m_par.state_dict()[k]), k
    for k, v in m_single.state_dict().items():
        torch.testing.assert_close(m_par.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)

    ddp_rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    one_rows = [r for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in one_rows]
    assert [r["tokens"] for r in ddp_rows] == [r["tokens"] for r in one_rows]  # global tokens, not per rank
    for a, b in zip(ddp_rows, one_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000005", "step_000010"]


@pytest.mark.slow
def test_fsdp_resume_is_bit_identical(data_dir, tmp_path):
    """Stop an FSDP2 run at step 3 and resume it to step 6: the same loss as 6 steps in one go."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "GPTCORE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def launch(steps: int, out: Path) -> float:
        # warmup 2: the lr of steps 0..2 is the same whether max_steps is 3 or 6
        cfg = make_config(max_steps=steps, batch_size=4, ckpt_every=3, warmup_steps=2, fsdp=True)
        f = tmp_path / f"cfg{steps}.yaml"
        f.write_text(yaml.safe_dump(cfg.to_dict()))
        out.mkdir(exist_ok=True)
        r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(driver), str(f), str(data_dir), str(out)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row][-1]["loss"]

    straight = launch(6, tmp_path / "straight")
    launch(3, tmp_path / "resumed")
    assert launch(6, tmp_path / "resumed") == straight
