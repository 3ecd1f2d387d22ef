"""A cache that never lies, and environment failures as one line — proven through `gptcore run`.

- A cached artifact damaged on disk (a tokenizer.json, a model's weights) is noticed at the cache
  hit, recomputed with one line saying so, and the stages after it are hits again.
- An interrupted `--refresh` (a real SIGTERM after a checkpoint) leaves a state the next plain
  run resumes from.
- A full disk (a real tmpfs, as root), an unwritable / missing / unreachable tracking store: one
  error line, exit 2, no retry, nothing created, checkpoints intact.
- The promotion gate compares only versions measured alike (dataset, tokenizer, evaluation).
- The config is checked whole, with what can be known up front (a tokenizer.path's vocabulary).

The real engines on a tiny config, each run in a subprocess with its own store and MLflow database.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_bytes=120000", "tokenizer.vocab_size=300", "model.n_layer=1", "model.n_embd=64", "model.n_head=2",
        "model.block_size=256", "train.block_size=64", "train.batch_size=4", "train.eval_every=100",
        "train.eval_batches=2", "train.num_threads=1", "eval.batches=2", "eval.sample_tokens=8", "eval.seeds=[0]",
        "finetune.max_steps=3", "finetune.max_examples=40", "finetune.eval_batches=1", "finetune.num_samples=1",
        "finetune.batch_size=4", "data.num_proc=1", "train.max_steps=20", "train.ckpt_every=5"]


def _args(tmp_path: Path, *sets: str, until: str = "register", store: Path | None = None, extra=()) -> list[str]:
    args = [sys.executable, "-m", "gptcore.cli", "run", str(REPO / "configs" / "tiny.yaml"), "--until", until, *extra]
    for s in (*TINY, f"tracking.result_store={store or tmp_path / 'store'}", *sets):
        args += ["--set", s]
    return args


def _env(tmp_path: Path, uri: str | None = None) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=uri or f"sqlite:///{tmp_path / 'mlflow.db'}", GPTCORE_PROGRESS="0")


def gptcore(tmp_path: Path, *sets: str, until: str = "register", ok: bool = True, uri: str | None = None,
            store: Path | None = None, extra=()) -> subprocess.CompletedProcess:
    r = subprocess.run(_args(tmp_path, *sets, until=until, store=store, extra=extra), cwd=tmp_path,
                       env=_env(tmp_path, uri), capture_output=True, text=True, timeout=900)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _statuses(stderr: str) -> dict[str, str]:
    return dict(re.findall(r"\[gptcore\] (\w+): (cached|computed) in", stderr))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one line on stderr (MLflow's own INFO lines about creating a new
    database aside), no traceback; returns it."""
    lines = [ln for ln in r.stderr.strip().splitlines() if " INFO mlflow." not in ln]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and [ln for ln in lines if not ln.startswith("[gptcore] ")] == errors, r.stderr[-3000:]
    return errors[0]


# --------------------------------------------------------------------------------------------
# a cache hit is verified before it is trusted


def test_a_corrupt_cached_tokenizer_is_recomputed_and_the_stages_after_it_hit(tmp_path):
    gptcore(tmp_path, until="shard")
    tok = next((tmp_path / "store" / "artifacts" / "train_tokenizer").glob("*/tokenizer.json"))
    good = tok.read_bytes()
    _flip_a_byte(tok)
    r = gptcore(tmp_path, until="shard")
    assert f"[gptcore] train_tokenizer: cached result is corrupt ({tok}): recomputing" in r.stderr, r.stderr[-2000:]
    assert _statuses(r.stderr) == {"download": "cached", "train_tokenizer": "computed", "shard": "cached"}
    assert tok.read_bytes() == good  # the same tokenizer again (training is deterministic)
    from gptcore.tokenizer import load_tokenizer

    assert load_tokenizer(tok.parent).vocab_size == 300  # it loads: its own checksum holds


@pytest.mark.slow
def test_corrupt_model_weights_and_a_missing_shard_are_recomputed_resuming(tmp_path):
    gptcore(tmp_path, until="evaluate")
    weights = next((tmp_path / "store" / "artifacts" / "pretrain").glob("*/model.safetensors"))
    _flip_a_byte(weights)
    r = gptcore(tmp_path, until="evaluate")
    assert f"[gptcore] pretrain: cached result is corrupt ({weights}): recomputing" in r.stderr, r.stderr[-2000:]
    assert "resumed from step 20" in r.stderr  # its checkpoints were kept, not emptied
    assert _statuses(r.stderr)["pretrain"] == "computed" and _statuses(r.stderr)["evaluate"] == "cached"
    from safetensors.numpy import load_file

    assert load_file(weights)  # a readable safetensors file again (MLflow-free, torch-free reader)

    shard = next((tmp_path / "store" / "runs" / "shard").glob("*/train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated: the header no longer matches the size
    r = gptcore(tmp_path, until="evaluate")
    assert f"[gptcore] shard: cached result is corrupt ({shard}): recomputing" in r.stderr, r.stderr[-2000:]
    assert _statuses(r.stderr) == {"download": "cached", "train_tokenizer": "cached", "shard": "computed",
                                   "pretrain": "cached", "evaluate": "cached"}
    again = gptcore(tmp_path, until="evaluate")  # healed: no stage recomputes any more
    assert set(_statuses(again.stderr).values()) == {"cached"}, again.stderr[-2000:]


@pytest.mark.slow
def test_an_interrupted_refresh_leaves_a_run_the_next_plain_run_resumes(tmp_path):
    sets = ("train.max_steps=150",)
    gptcore(tmp_path, *sets, until="pretrain")
    ckpts = lambda: sorted(p.name for p in (tmp_path / "store" / "runs" / "pretrain").glob("*/checkpoints/step_*"))  # noqa: E731
    assert "step_000150" in ckpts()
    p = subprocess.Popen(_args(tmp_path, *sets, until="pretrain", extra=["--refresh"]), cwd=tmp_path,
                         env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 300
    while not ("step_000150" not in ckpts() and "step_000010" in ckpts()):  # the refresh's own checkpoints
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)  # gptcore itself; a signal to the whole group is tests/test_pipeline_cli.py's
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-2000:]
    kept = ckpts()
    assert kept and "step_000150" not in kept
    step = int(kept[-1].split("_")[1])
    r = gptcore(tmp_path, *sets, until="pretrain")
    assert f"resumed from step {step}" in r.stderr, r.stderr[-2000:]
    assert _statuses(r.stderr)["pretrain"] == "computed"


# --------------------------------------------------------------------------------------------
# environment errors: one line, before any work where they can be known


@pytest.mark.parametrize("uri, message", [
    ("sqlite:////proc/gptcore-x.db", "error: cannot write the MLflow tracking store"),
    ("sqlite:///{tmp}/missing/dir/m.db", "error: the MLflow tracking store's folder does not exist ({tmp}/missing/dir)"),
    ("http://127.0.0.1:9/", "error: no MLflow tracking server answers"),
])
def test_a_bad_tracking_store_fails_first_in_one_line(tmp_path, uri, message):
    uri, message = uri.format(tmp=tmp_path), message.format(tmp=tmp_path)
    r = gptcore(tmp_path, until="download", ok=False, uri=uri)
    assert _one_error_line(r).startswith(message), r.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "missing").exists()  # no work, no folder made
    assert "[gptcore]" not in r.stderr  # not a single stage ran


def _tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a disk-full test mounts a small tmpfs, which needs root (CI here runs as root)")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN in this container?): {r.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "16m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_mid_training_is_one_line_and_keeps_the_checkpoints(tmp_path, small_disk):
    """The result store on a 16 MB tmpfs, filled up once the first checkpoint is written: the next
    checkpoint fails with ENOSPC (inside safetensors), which must be one line, exit 2, not retried,
    and leave the checkpoint before it loadable. (That a run resumes from such a checkpoint is
    tests/test_pipeline_engine.py's; here the kept one must load.)"""
    store = small_disk / "store"
    p = subprocess.Popen(_args(tmp_path, "train.max_steps=400", until="pretrain", store=store), cwd=tmp_path,
                         env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 300
    while not list(store.glob("runs/pretrain/*/checkpoints/step_000005")):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.1)
    with open(small_disk / "filler", "wb", buffering=0) as f:  # take every byte that is left (unbuffered:
        try:                                                      # close has nothing left to flush)
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass
    out, err = p.communicate(timeout=300)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    line = _one_error_line(r)
    assert line.startswith(f"error: no space left on device ({store}"), line
    assert "finished checkpoints" in line
    assert "resumed from step" not in out + err  # no Prefect retry (it would resume) of what cannot succeed
    from safetensors.numpy import load_file

    first = next(store.glob("runs/pretrain/*/checkpoints/step_000005"))
    assert load_file(first / "model.safetensors")  # intact, and no half-written step folder beside it:
    assert [p.name for p in first.parent.iterdir() if not p.name.startswith("step_")] == []


def test_a_full_tracking_database_is_one_line(tmp_path):
    disk = tmp_path / "ml"
    _tmpfs(disk, "200k")  # too small for MLflow's tables
    try:
        r = gptcore(tmp_path, until="download", ok=False, uri=f"sqlite:///{disk}/m.db")
        assert _one_error_line(r).startswith(f"error: no space left on device (sqlite:///{disk}/m.db)"), r.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_environment_errors_are_found_however_a_library_wraps_them(tmp_path):
    """What safetensors, SQLite (through SQLAlchemy and MLflow) and the OS raise on a full disk."""
    import errno
    import sqlite3

    from gptcore.errors import SetupError, environment_error

    try:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
    except OSError as exc:
        e = environment_error(exc)
    assert isinstance(e, SetupError) and e.what == "no space left on device" and e.where == str(tmp_path / "f")
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("mlflow could not log") from inner
    except RuntimeError as exc:
        assert environment_error(exc, where="sqlite:///x.db").message().startswith("no space left on device (sqlite:///x.db)")
    assert environment_error(ValueError("a bug")) is None


def test_a_tracking_server_that_gave_up_is_one_setup_error(monkeypatch):
    """What MLflow's own client raises once its retries against a dead server are spent (a closed
    port, retries off so it is quick) is the one-line SetupError naming the server."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from servers import free_port

    from gptcore.errors import SetupError, environment_error

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(MlflowException) as caught:
        MlflowClient(base).get_experiment("0")
    e = environment_error(caught.value)
    assert isinstance(e, SetupError) and e.message().startswith(f"the MLflow tracking server stopped answering ({base}): ")
    try:
        try:
            raise caught.value
        except MlflowException as inner:
            raise RuntimeError("a metric batch could not be logged") from inner
    except RuntimeError as outer:
        assert environment_error(outer, where="store").where == base  # found in the chain, the server named


def test_tasks_shortens_mlflows_http_retries_unless_the_user_set_them():
    """MLflow's own settings objects read what importing tasks set: 2 retries and a 30 s timeout,
    while a value the user exported wins."""
    code = ("import tasks; from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES as r, "
            "MLFLOW_HTTP_REQUEST_TIMEOUT as t; print(r.get(), t.get())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    out = lambda **kw: subprocess.run([sys.executable, "-c", code], env={**env, **kw}, capture_output=True,  # noqa: E731
                                      text=True, check=True, cwd=REPO).stdout.split()
    assert out() == ["2", "30"]
    assert out(MLFLOW_HTTP_REQUEST_MAX_RETRIES="7") == ["7", "30"]


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_run_fails_in_one_line(tmp_path):
    """`mlflow server` SIGKILLed after pre-training's first checkpoint. MLflow's default client would
    retry each request for about 4 minutes (measured: still running 15 min later); with the retries
    gptcore sets it fails with the one line naming the server, exit 2, no traceback, no Prefect retry."""
    from servers import free_port, wait_until_up

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                               "--default-artifact-root", str(tmp_path / "artifacts")],
                              cwd=tmp_path, env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    p = None
    try:
        wait_until_up(base + "/health", server)
        env = {k: v for k, v in _env(tmp_path, base).items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
        p = subprocess.Popen(_args(tmp_path, "train.max_steps=5000", "tracking.log_every=1", until="pretrain"),
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        deadline = time.time() + 300
        while not list((tmp_path / "store").glob("runs/pretrain/*/checkpoints/step_*")):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        try:  # a liveness bound, not a speed: MLflow's own retries take minutes per request
            out, err = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail("hung: still retrying against the dead tracking server 150 s later")
    finally:
        for proc in (server, p):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors == [err.strip().splitlines()[-1]], err[-3000:]  # one, and the last word
    assert errors[0].startswith(f"error: the MLflow tracking server stopped answering ({base}): "), errors
    assert "resumed from step" not in out + err  # not retried by Prefect


# --------------------------------------------------------------------------------------------
# the promotion gate compares like with like


@pytest.fixture
def mlflow_client(tmp_path):
    from tasks import tracking

    return tracking.client(f"sqlite:///{tmp_path / 'gate.db'}")


def _version(c, like: dict, sha: str, value: float, name: str = "ft"):
    from tasks import tracking

    exp = tracking.experiment_id(c, "gate")
    run_id = tracking.start_run(c, exp, "register")
    model_id = c.create_logged_model(exp, source_run_id=run_id).model_id
    version, _ = tracking.register_version(c, name, model_id, run_id, sha, "val_loss_after", value, like=like)
    return tracking.promotion_gate(c, name, version, "val_loss_after", value)


def test_the_gate_compares_only_versions_measured_alike(mlflow_client):
    c = mlflow_client
    like = {"dataset": "d1", "tokenizer": "t8192", "eval": "e"}
    assert _version(c, like, "a", 3.0)[0]
    promoted, why = _version(c, {**like, "tokenizer": "t4096"}, "b", 1.0)  # lower loss, other vocabulary
    assert not promoted and why.startswith("no comparison: different tokenizer"), why
    promoted, why = _version(c, {**like, "dataset": "mine"}, "c", 1.0)
    assert not promoted and why.startswith("no comparison: different dataset"), why
    assert str(c.get_model_version_by_alias("ft", "champion").version) == "1"
    assert str(c.get_model_version_by_alias("ft", "candidate").version) == "3"
    assert c.get_model_version("ft", "3").tags["promotion"].startswith("no comparison: different dataset")
    promoted, why = _version(c, like, "d", 2.0)  # measured alike and better: promoted
    assert promoted and why.startswith("promoted: val_loss_after 2.0000 < champion v1's 3.0000"), why


def test_the_same_weights_registered_again_keep_one_version_with_current_tags(mlflow_client):
    """A cached rerun registers the same weights: no new version; what they were measured on is
    rewritten only where it changed (read back through MLflow's own registry)."""
    from tasks import tracking

    c = mlflow_client
    exp = tracking.experiment_id(c, "gate")
    run_id = tracking.start_run(c, exp, "register")
    model_id = c.create_logged_model(exp, source_run_id=run_id).model_id
    first = {"dataset": "d1", "eval": "e"}
    assert tracking.register_version(c, "pt", model_id, run_id, "w", "val_bpb", 2.0, like=first) == ("1", True)
    for like in (first, {"dataset": "d2", "eval": "e"}):
        assert tracking.register_version(c, "pt", model_id, run_id, "w", "val_bpb", 2.0, like=like) == ("1", False)
        tags = c.get_model_version("pt", "1").tags
        assert {k: tags[tracking.LIKE + k] for k in like} == like
    assert len(c.search_model_versions("name='pt'")) == 1


def test_what_a_finetune_was_measured_on_follows_dataset_content_and_tokenizer(tmp_path):
    """`measured_on`: a JSONL by content (not path), a built-in by name, the model folder's tokenizer."""
    from gptcore.config import load_config
    from tasks.stages import measured_on

    rows = "".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(200))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "mine.jsonl").write_text(rows)
    (tmp_path / "b" / "mine.jsonl").write_text(rows)
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"config": {"block_size": 128}}))
    (model / "tokenizer" / "tokenizer.json").write_text(json.dumps({"sha256": "tok-8192"}))

    def like(dataset, tok="tok-8192"):
        (model / "tokenizer" / "tokenizer.json").write_text(json.dumps({"sha256": tok}))
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"finetune.dataset={dataset}",
                                                           f"tracking.result_store={tmp_path / 'store'}"])
        return measured_on(cfg, {"dir": str(model)}, "val_loss_after")

    builtin = like("python-docstrings")
    mine = like(str(tmp_path / "a" / "mine.jsonl"))
    assert mine["dataset"] != builtin["dataset"] and mine["tokenizer"] == builtin["tokenizer"]
    assert like(str(tmp_path / "b" / "mine.jsonl"))["dataset"] == mine["dataset"]  # same bytes elsewhere: alike
    (tmp_path / "b" / "mine.jsonl").write_text(rows.replace("say 7", "say seven"))
    assert like(str(tmp_path / "b" / "mine.jsonl"))["dataset"] != mine["dataset"]
    assert like("python-docstrings", tok="tok-4096")["tokenizer"] != builtin["tokenizer"]


@pytest.mark.slow
def test_the_gate_refuses_another_vocabulary_and_another_dataset_through_the_cli(tmp_path):
    """The two reproductions: a vocab-400 fine-tune vs a vocab-300 champion, and a --base fine-tune on
    one's own 200-line JSONL vs the champion scored on python-docstrings."""
    from mlflow.tracking import MlflowClient

    gptcore(tmp_path)
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(c.get_model_version_by_alias("gptcore-finetuned", "champion").version) == "1"
    r = gptcore(tmp_path, "tokenizer.vocab_size=400")
    assert "gptcore-finetuned v2: no comparison: different tokenizer" in r.stderr, r.stderr[-2000:]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"instruction": f"Add {i} and {i}.", "output": str(2 * i)})
                                                 + "\n" for i in range(200)))
    base = max((tmp_path / "store" / "artifacts" / "pretrain").iterdir(), key=os.path.getmtime)
    r = gptcore(tmp_path, f"finetune.dataset={tmp_path / 'mine.jsonl'}", extra=["--base", str(base)])
    assert "gptcore-finetuned v3: no comparison: different dataset" in r.stderr, r.stderr[-2000:]
    assert str(c.get_model_version_by_alias("gptcore-finetuned", "champion").version) == "1"
    register = c.search_runs([e.experiment_id for e in c.search_experiments()],
                             filter_string="tags.`gptcore.stage` = 'register'", order_by=["attribute.start_time DESC"])[0]
    assert "no comparison: different dataset" in register.data.tags["promotion"]  # the reason, on the run


# --------------------------------------------------------------------------------------------
# the whole config before the first stage


def test_a_model_vocab_below_a_given_tokenizers_fails_before_any_stage(tmp_path):
    from gptcore.tokenizer import ENDOFTEXT, train_files

    (tmp_path / "t.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    vocab = train_files([tmp_path / "t.txt"], tmp_path / "tok", 300, "gpt4", [ENDOFTEXT], "bpe").vocab_size
    r = gptcore(tmp_path, f"tokenizer.path={tmp_path / 'tok'}", f"model.vocab_size={vocab - 1}", ok=False)
    assert _one_error_line(r).startswith(f"error: model.vocab_size {vocab - 1} is below the tokenizer's {vocab} (model.vocab_size)")
    assert not (tmp_path / "store").exists()


def test_a_base_folder_that_is_not_a_model_fails_before_any_stage(tmp_path):
    (tmp_path / "notamodel").mkdir()
    r = gptcore(tmp_path, until="finetune", ok=False, extra=["--base", str(tmp_path / "notamodel")])
    assert _one_error_line(r).startswith("error: not a gptcore model folder (no readable config.json)")
    assert not (tmp_path / "store").exists()
