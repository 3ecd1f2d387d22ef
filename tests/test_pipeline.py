"""The pipeline's orchestration: content-keyed caching, --until/--refresh, MLflow contents, the gate.

The gptcore library functions are replaced by counting stand-ins (tests/pipeline_fakes.py), so
these tests see exactly which stages did work; the real functions run in test_pipeline_real.py.
Flows run in-process against one throwaway Prefect server for the whole module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_fakes  # noqa: E402

TINY = ["data.max_bytes=3000", "train.max_steps=12", "finetune.max_steps=4", "tracking.log_every=5"]
STAGES = ["download", "train_tokenizer", "shard", "pretrain", "evaluate", "finetune", "register"]


@pytest.fixture(scope="module")
def prefect_server():
    """A throwaway Prefect server for the module; yields its API URL (for subprocesses too)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory):
    """One MLflow store for the module (creating a sqlite store costs seconds); experiments per test."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture
def pipe(prefect_server, shared_mlflow, tmp_path, monkeypatch, request):
    """Run the pipeline on the stand-ins in tmp_path; returns (run(overrides, **kw) -> report, CALLS)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_mlflow)
    (tmp_path / "c.yaml").write_text(f"run: {{name: {request.node.name[5:40]}}}\n")
    calls = pipeline_fakes.install(monkeypatch)
    from flows.pipeline import run_pipeline

    def run(overrides=(), **kw):
        return run_pipeline("c.yaml", [*TINY, *overrides], quiet=False, **kw)

    return run, calls


def status(report) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in report["rows"]}


def test_second_run_is_all_cache_hits_and_model_change_reruns_pretrain_not_tokenizer(pipe):
    run, calls = pipe
    first = run()
    assert status(first) == {s: "computed" for s in STAGES}
    assert dict(calls) == {s: 1 for s in STAGES if s != "register"}

    second = run()
    assert status(second) == {s: "cached" for s in STAGES}
    assert dict(calls) == {s: 1 for s in STAGES if s != "register"}  # no stage did any work
    assert [r["metric"] for r in second["rows"]][:6] == [r["metric"] for r in first["rows"]][:6]
    from flows.runner import format_report

    assert set(second["models"]) == {"pretrain", "finetune"} and second["models"] == first["models"]
    text = format_report(second)  # the summary names the model folders, as a path to type from here
    for stage, folder in second["models"].items():
        assert (Path(folder) / "config.json").is_file()
        assert re.search(rf"^  {stage} +{re.escape(str(Path(folder).resolve().relative_to(Path.cwd().resolve())))}$",
                         text, re.M), text

    third = run(["model.n_layer=1"])  # the model changed: data side cached, model side recomputed
    assert status(third) == {"download": "cached", "train_tokenizer": "cached", "shard": "cached",
                             "pretrain": "computed", "evaluate": "computed", "finetune": "computed",
                             "register": "computed"}
    assert calls["train_tokenizer"] == 1 and calls["pretrain"] == 2

    fourth = run(["tokenizer.vocab_size=300"])  # the tokenizer changed: everything after download reruns
    assert status(fourth)["download"] == "cached"
    assert all(status(fourth)[s] == "computed" for s in STAGES[1:6])


def test_refresh_recomputes_and_until_stops(pipe):
    run, calls = pipe
    report = run(until="shard")
    assert [r["stage"] for r in report["rows"]] == ["download", "train_tokenizer", "shard"]
    assert "pretrain" not in calls
    report = run(until="shard", refresh=True)
    assert set(status(report).values()) == {"computed"}
    assert calls["download"] == 2 and calls["shard"] == 2
    # pre-training resumes from checkpoints in its folder; --refresh starts it from scratch
    report = run(until="pretrain")
    (marker,) = [d / "checkpoints-from-before" for d in (Path(report["store"]) / "artifacts" / "pretrain").iterdir()]
    marker.write_text("x")
    run(until="pretrain")
    assert marker.exists()  # a cache hit touches nothing
    run(until="pretrain", refresh=True)
    assert not marker.exists() and calls["pretrain"] == 2


def test_cache_entry_whose_files_were_deleted_is_recomputed(pipe):
    import shutil

    run, calls = pipe
    report = run(until="train_tokenizer")
    shutil.rmtree(Path(report["store"]) / "artifacts" / "train_tokenizer")
    report = run(until="train_tokenizer")
    assert status(report) == {"download": "cached", "train_tokenizer": "computed"}
    assert (Path(report["store"]) / "artifacts" / "train_tokenizer").is_dir()


def test_mlflow_holds_params_nested_runs_metrics_and_artifacts(pipe):
    from mlflow.tracking import MlflowClient

    from gptcore.config import load_config

    run, _ = pipe
    report = run()
    c = MlflowClient(report["uri"])
    parent = c.get_run(report["run_id"])
    cfg = load_config("c.yaml", TINY)
    assert parent.data.params == {k: str(v) for k, v in cfg.flat().items()}
    assert parent.info.status == "FINISHED"
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert len(flow_run_id) == 36  # a UUID

    children = {r.info.run_name: r for r in c.search_runs([report["experiment_id"]],
                f"tags.mlflow.parentRunId = '{report['run_id']}'")}
    assert set(children) == set(STAGES)
    assert all(r.data.tags["prefect.flow_run_id"] for r in children.values())

    pre = children["pretrain"]
    loss = c.get_metric_history(pre.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(1, 13))  # every step arrived, in batches of 5
    assert loss[0].value == pytest.approx(4.9)
    assert c.get_metric_history(pre.info.run_id, "val_bpb")[0].value == pytest.approx(1000.0)
    assert parent.data.metrics["evaluate.val_bpb"] == pytest.approx(1000.0)

    def files(run_id, path=""):
        out = []
        for f in c.list_artifacts(run_id, path):
            out += files(run_id, f.path) if f.is_dir else [f.path]
        return set(out)

    assert "tokenizer/tokenizer.json" in files(children["train_tokenizer"].info.run_id)
    assert "manifest.json" in files(children["shard"].info.run_id)
    assert "loss.png" in files(pre.info.run_id)
    models = c.search_logged_models([report["experiment_id"]], filter_string=f"source_run_id = '{pre.info.run_id}'")
    import mlflow.artifacts  # the model folder lives once, inside the run's logged MLflow model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=models[0].artifact_location, tracking_uri=report["uri"]))
    assert {"config.json", "model.safetensors"} <= {f.name for f in local.rglob("*")}
    assert {"eval.json", "eval.txt", "samples.txt"} <= files(children["evaluate"].info.run_id)
    assert "samples.txt" in files(children["finetune"].info.run_id)
    assert "summary.md" in files(report["run_id"])
    png = Path(c.download_artifacts(pre.info.run_id, "loss.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a cached rerun: new runs tagged cached, key metrics re-attached, pointing at the source run
    again = run()
    kids = {r.info.run_name: r for r in c.search_runs([again["experiment_id"]],
            f"tags.mlflow.parentRunId = '{again['run_id']}'")}
    assert kids["pretrain"].data.tags["gptcore.cached"] == "true"
    assert kids["pretrain"].data.tags["gptcore.source_run_id"] == pre.info.run_id
    assert kids["pretrain"].data.metrics["val_bpb"] == pytest.approx(1000.0)


def test_promotion_gate_moves_champion_only_for_better_bpb(pipe, monkeypatch):
    from mlflow.tracking import MlflowClient

    run, _ = pipe  # the stand-in's val bpb is 1 / train.lr: a higher lr "wins"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///gate.db")  # an empty registry of its own
    r1 = run(["train.lr=0.001"])
    c = MlflowClient(r1["uri"])
    assert c.get_model_version_by_alias("gptcore-pretrained", "champion").version == 1

    run(["train.lr=0.002"])  # bpb 500 < 1000: promoted
    assert c.get_model_version_by_alias("gptcore-pretrained", "champion").version == 2

    r3 = run(["train.lr=0.0005"])  # bpb 2000: registered as candidate, champion stays
    assert c.get_model_version_by_alias("gptcore-pretrained", "candidate").version == 3
    assert c.get_model_version_by_alias("gptcore-pretrained", "champion").version == 2
    why = c.get_model_version("gptcore-pretrained", "3").tags["promotion"]
    assert why.startswith("kept champion") and "2000.0000" in why and "500.0000" in why
    reg = [row for row in r3["rows"] if row["stage"] == "register"][0]
    assert "kept champion" in c.get_run(reg["run_id"]).data.tags["promotion"]
    text = Path(c.download_artifacts(reg["run_id"], "promotion.txt")).read_text()
    assert "gptcore-pretrained v3: kept champion" in text

    # the same model again is not a new version
    run(["train.lr=0.0005"])
    assert len(c.search_model_versions("name='gptcore-pretrained'")) == 3
    mv = c.get_model_version("gptcore-pretrained", "1")
    assert mv.source == c.get_logged_model(mv.tags["model_id"]).artifact_location  # a logged MLflow model
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=r1["uri"]))
    cfg = json.loads(next(local.rglob("config.json")).read_text())  # the model folder, inside the MLflow model
    assert cfg["lr"] == 0.001
    runs_artifacts = [f.path for f in c.list_artifacts(mv.run_id)]
    assert "loss.png" in runs_artifacts and "model" not in runs_artifacts, runs_artifacts  # the pretrain run: stored once


def test_tracking_disabled_runs_without_mlflow(pipe, tmp_path, monkeypatch):
    run, calls = pipe
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    report = run(["tracking.enabled=false"])
    assert report["uri"] is None and report["run_id"] is None
    assert report["rows"][-1]["metric"] == "tracking disabled"
    assert calls["finetune"] == 1
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------
# `gptcore run` in subprocesses (the real CLI on the stand-ins), against the module's server

FAKES = Path(__file__).resolve().parent / "pipeline_fakes.py"
CLI_TINY = [a for o in TINY for a in ("--set", o)]


def fake_cli(cwd, api_url, *args, env=None):
    e = dict(os.environ, PREFECT_API_URL=api_url, MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db", **(env or {}))
    return subprocess.Popen([sys.executable, str(FAKES), *map(str, args)], cwd=cwd, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _runs(cwd, experiment="t"):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in c.search_runs([exp.experiment_id])} if exp else {}


def test_damaged_input_inside_a_stage_is_one_error_line_and_a_failed_run(prefect_server, tmp_path):
    (tmp_path / "c.yaml").write_text("run: {name: t}\n")
    p = fake_cli(tmp_path, prefect_server, "run", "c.yaml", *CLI_TINY, env={"FAKE_FAIL": "prepare_shards"})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: shard file is damaged (bad magic) (x/train_000.bin): rerun with --refresh"]
    runs = _runs(tmp_path)
    assert runs["pipeline"].info.status == "FAILED" and runs["shard"].info.status == "FAILED"
    assert runs["train_tokenizer"].info.status == "FINISHED" and "pretrain" not in runs
    assert list((tmp_path / ".gptcore" / "artifacts").iterdir()) != []  # finished stages stay cached


def test_two_runs_at_once_share_the_store_without_redoing_work(prefect_server, tmp_path):
    (tmp_path / "c.yaml").write_text("run: {name: t}\n")
    procs = [fake_cli(tmp_path, prefect_server, "run", "c.yaml", *CLI_TINY) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    tables = [[line.split() for line in out.splitlines()[1:8]] for out, _ in outs]
    for stage in range(6):  # each stage's work was done by exactly one of the two runs
        statuses = sorted(t[stage][1] for t in tables)
        assert statuses in (["cached", "computed"], ["computed", "cached"]), tables
    metrics = [[" ".join(row[3:]) for row in t[:6]] for t in tables]
    assert metrics[0] == metrics[1]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents = c.search_runs([c.get_experiment_by_name("t").experiment_id], "attributes.run_name = 'pipeline'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    assert len(c.search_model_versions("name='gptcore-pretrained'")) == 1  # not registered twice


def test_download_retries_flaky_io_but_not_user_errors(pipe, monkeypatch):
    from gptcore.errors import DataError

    run, _ = pipe
    attempts = []

    def flaky(section, out_file):
        attempts.append("flaky")
        if len(attempts) == 1:
            raise ConnectionError("the hub dropped the connection")
        return pipeline_fakes.download(section, out_file)

    monkeypatch.setattr(sys.modules["gptcore.data.sources"], "download", flaky)
    assert status(run(until="download")) == {"download": "computed"}
    assert attempts == ["flaky", "flaky"]  # failed once, retried after a backoff, succeeded

    def empty(section, out_file):
        attempts.append("empty")
        raise DataError("the source yielded no documents", section.source, "point data.source at text")

    monkeypatch.setattr(sys.modules["gptcore.data.sources"], "download", empty)
    with pytest.raises(DataError, match="yielded no documents"):
        run(["data.max_bytes=5000"], until="download")
    assert attempts.count("empty") == 1  # bad input is not retried


def test_file_inputs_are_keyed_by_content_not_path(pipe, tmp_path):
    """Editing the JSONL behind finetune.dataset, or a file a files: corpus matches, recomputes the
    stage that reads it (and what follows); the same bytes under a new mtime stay a hit."""
    import time

    run, calls = pipe
    (tmp_path / "corpus").mkdir()
    doc = tmp_path / "corpus" / "a.txt"
    doc.write_text("def f():\n    return 1\n" * 50)
    ds = tmp_path / "mine.jsonl"
    ds.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    sets = [f"data.source=files:{tmp_path}/corpus/*.txt", f"finetune.dataset={ds}"]
    assert status(run(sets))["finetune"] == "computed"
    assert set(status(run(sets)).values()) == {"cached"}

    os.utime(ds, (time.time() + 5, time.time() + 5))  # touched, same bytes: the digest is checked, still a hit
    assert status(run(sets))["finetune"] == "cached"
    ds.write_text(json.dumps({"instruction": "say hello", "output": "hello"}) + "\n")
    st = status(run(sets))
    assert st["finetune"] == "computed" and st["pretrain"] == "cached"

    doc.write_text("def g():\n    return 2\n" * 50)
    assert status(run(sets))["download"] == "computed"  # (the stand-in corpus it writes is the same: the rest hits)
