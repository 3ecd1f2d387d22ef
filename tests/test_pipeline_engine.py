"""One source of truth for cache keys, proven through `gptcore run` with the real engines.

- A change of cadence alone (`train.log_every`) is a cache hit for every stage.
- Raising `train.max_steps` continues the earlier run from its newest checkpoint: the pretrain
  stage says "resumed from step N", and its MLflow loss history starts after step N.
- A `--base` fine-tune reruns when a `train.*` key it reads changes (grad_clip), and not when a
  key it does not read changes (log_every).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_bytes=120000", "tokenizer.vocab_size=300", "model.n_layer=1", "model.n_embd=64", "model.n_head=2",
        "model.block_size=256", "train.block_size=64", "train.batch_size=4", "train.eval_every=100",
        "train.eval_batches=2", "train.num_threads=1", "eval.batches=2", "eval.sample_tokens=8", "eval.seeds=[0]",
        "finetune.max_steps=3", "finetune.max_examples=40", "finetune.eval_batches=1", "finetune.num_samples=1",
        "finetune.batch_size=4", "data.num_proc=1"]


def _statuses(stderr: str) -> dict[str, str]:
    return dict(re.findall(r"\[gptcore\] (\w+): (cached|computed)", stderr))


@pytest.fixture
def gptcore_run(tmp_path, run_cli):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GPTCORE_PROGRESS": "0"}

    def _run(*sets: str, until: str = "pretrain", base: Path | None = None):
        args = ["run", REPO / "configs" / "tiny.yaml", "--until", until]
        for s in (*TINY, f"tracking.result_store={tmp_path / 'store'}", *sets):
            args += ["--set", s]
        if base is not None:
            args += ["--base", base]
        r = run_cli(*args, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    return _run


def _stage_runs(tmp_path, stage: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, filter_string=f"tags.`gptcore.stage` = '{stage}'", order_by=["attribute.start_time ASC"])
    return c, runs


def test_cadence_is_a_hit_extension_resumes_and_base_finetune_keys(tmp_path, gptcore_run):
    first = gptcore_run("train.max_steps=6")
    assert _statuses(first.stderr)["pretrain"] == "computed"

    again = gptcore_run("train.max_steps=6", "train.log_every=3", "train.ckpt_every=2", "train.progress=false")
    assert set(_statuses(again.stderr).values()) == {"cached"}, again.stderr[-2000:]

    longer = gptcore_run("train.max_steps=12")
    assert _statuses(longer.stderr) == {"download": "cached", "train_tokenizer": "cached", "shard": "cached",
                                        "pretrain": "computed"}
    assert "resumed from step 6" in longer.stderr
    c, runs = _stage_runs(tmp_path, "pretrain")
    ext = runs[-1]
    steps = [m.step for m in c.get_metric_history(ext.info.run_id, "loss")]
    assert steps and min(steps) > 6 and max(steps) == 12, steps
    assert ext.data.metrics["resumed_from_step"] == 6
    first_steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")]
    assert max(first_steps) == 6

    # the 12-step model, as the pipeline published it, is the base of a --base fine-tune
    base = max((tmp_path / "store" / "artifacts" / "pretrain").iterdir(), key=os.path.getmtime)
    assert (base / "model.safetensors").is_file()
    tuned = gptcore_run(until="finetune", base=base)
    assert _statuses(tuned.stderr)["finetune"] == "computed"
    same = gptcore_run("train.log_every=7", until="finetune", base=base)  # finetune does not read train.log_every
    assert _statuses(same.stderr)["finetune"] == "cached"
    clipped = gptcore_run("train.grad_clip=0.5", until="finetune", base=base)  # ... but it does read grad_clip
    assert _statuses(clipped.stderr)["finetune"] == "computed"


def test_pipeline_stages_run_on_two_ranks(tmp_path, gptcore_run):
    """`gptcore run --set train.nproc_per_node=2`: pretrain and finetune run as 2 gloo ranks under torchrun,
    MLflow records world_size 2, and no rank outlives the run."""
    import psutil

    r = gptcore_run("train.max_steps=4", "train.nproc_per_node=2", "train.batch_size=2", until="finetune")
    assert _statuses(r.stderr)["pretrain"] == "computed" and _statuses(r.stderr)["finetune"] == "computed"
    for stage in ("pretrain", "finetune"):
        _, runs = _stage_runs(tmp_path, stage)
        assert runs[-1].data.params["world_size"] == "2" and runs[-1].data.params["device"] == "cpu", stage
    assert not [p for p in psutil.process_iter(["cmdline"]) if "gptcore.training.worker" in (p.info["cmdline"] or [])
                and any(str(tmp_path) in a for a in p.info["cmdline"])]
