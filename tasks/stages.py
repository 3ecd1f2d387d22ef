"""The seven pipeline stages as Prefect tasks: inputs in, a small result out, the work in `gptcore`.

    download -> train_tokenizer -> shard -> pretrain -> evaluate -> finetune -> register

Every task gets the typed `Config`, its content `key` (tasks/caching.py), the result store, the
upstream results it reads, and `track` = {"uri", "run_id"} of the MLflow run to log into (None
when tracking is off). It returns a JSON-able dict of paths, sha256s and metrics; Prefect persists
that dict under the key, so a later run with the same key skips the work.

`STAGES` at the bottom is the one record per stage the runner reads: its task, the `Reads` its key
derives from, the gptcore packages it runs, whether it resumes in a stable folder, and the one
figure the summary table shows.

Results name the MLflow run that computed them (`run_id`), so a cached stage can point at the
run holding its artifacts instead of uploading them again.
"""

from __future__ import annotations

import functools
import inspect
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tasks  # noqa: F401  (offline defaults first)
from prefect import task
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.tasks import exponential_backoff

from gptcore import tokenizer as tk
from gptcore.config import Config
from gptcore.data import sharding as shards_mod
from gptcore.data import sources
from gptcore.errors import CheckpointError, DataError, GptcoreError, environment_errors
from gptcore import evaluation, finetuning, training  # their READS: torch-free (engines import lazily)
from gptcore.fileio import atomic_dir, atomic_write_text, link_tree, sha256_file
from gptcore.reads import Reads
from tasks import nodes, tracking
from tasks.caching import artifact_dir, file_digests, folder_digests
from tasks.progress_log import StageProgress, stage_logger

# The key is computed by the flow from content hashes; Prefect adds the task's own source.
BY_CONTENT = CachePolicy.from_cache_key_fn(lambda ctx, params: params["key"]) + TASK_SOURCE
CACHED = dict(cache_policy=BY_CONTENT, persist_result=True, result_serializer="json")


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes and flaky I/O, never a GptcoreError: bad input stays bad."""
    try:
        state.result()
    except GptcoreError:
        return False
    except BaseException:
        return True
    return True


def _one_line(fn):
    """A task whose environment failures (a full disk, a read-only folder) leave it as one-line
    `SetupError`s naming the folder: Prefect neither retries them nor prints their traceback."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def body(*args, **kwargs):
        given = sig.bind_partial(*args, **kwargs).arguments
        with environment_errors(given.get("workdir") or given.get("store")):
            return fn(*args, **kwargs)

    return body


def _client(track: dict | None):
    return (tracking.client(track["uri"]), track["run_id"]) if track else (None, None)


def _log_artifact(track: dict | None, path: str | Path, artifact_path: str | None = None) -> None:
    c, run_id = _client(track)
    if c is None or not Path(path).exists():
        return
    if Path(path).is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def _verified(path: str | Path, sha256: str, what: str) -> Path:
    """`path`, after checking that it still holds the bytes the upstream stage produced."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} is missing", str(path), "rerun with --refresh to rebuild it")
    if sha256_file(path) != sha256:
        raise DataError(f"{what} changed since it was made (sha256 mismatch)", str(path), "rerun with --refresh to rebuild it")
    return path


def _fresh(out: Path, fresh: bool, published: Path | None = None) -> Path:
    """A stage's resumable folder; `fresh` (--refresh) empties it, but only on the first attempt,
    so Prefect's retries still resume from the newest checkpoint.

    The result published from that folder goes first: the old cache entry then points at nothing,
    so if this refresh is interrupted the next plain run recomputes — resuming from the checkpoints
    this refresh wrote — instead of trusting a result whose training folder is gone."""
    from prefect.runtime import task_run

    if fresh and task_run.run_count <= 1:
        for folder in (published, out):
            if folder is not None and folder.exists():
                shutil.rmtree(folder)
    return out


class _Work:
    """Times the gptcore call(s) of a task: `seconds` = the work, the rest of a stage is orchestration."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------


@task(name="download", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=_retry_unless_user_error, **CACHED)
@_one_line
def download(config: Config, key: str, store: str, track: dict | None = None) -> dict:
    """The capped corpus as JSONL ({"text": ...} per document)."""
    out = artifact_dir(store, "download", key) / "corpus.jsonl"
    with _Work() as w:
        info = sources.download(config.data, out)
    return {"path": str(info["path"]), "sha256": info["sha256"], "bytes": info["bytes"],
            "documents": info["documents"], "work_seconds": w.seconds, "run_id": track and track["run_id"]}


@task(name="train_tokenizer", **CACHED)
@_one_line
def train_tokenizer(config: Config, key: str, store: str, corpus: dict, track: dict | None = None) -> dict:
    """Train the BPE (or sentencepiece) tokenizer on the corpus — or load `tokenizer.path`."""
    section = config.tokenizer
    out = artifact_dir(store, "train_tokenizer", key)
    with _Work() as w:
        if section.path == "gpt2":
            tok = tk.gpt2_tokenizer()
        elif section.path:
            tok = tk.load_tokenizer(section.path)
        else:
            texts = sources.read_jsonl_documents(_verified(corpus["path"], corpus["sha256"], "corpus"))
            tok = tk.train_tokenizer(texts, section)
        with atomic_dir(out) as tmp:
            tok.save(tmp)
    _log_artifact(track, out / "tokenizer.json", "tokenizer")
    return {"dir": str(out), "sha256": tok.sha256, "files": folder_digests(out, store), "vocab_size": tok.vocab_size,
            "work_seconds": w.seconds,
            "run_id": track and track["run_id"]}


@task(name="shard", **CACHED)
@_one_line
def shard(config: Config, key: str, store: str, workdir: str, corpus: dict, tokenizer: dict, track: dict | None = None,
          fresh: bool = False) -> dict:
    """Tokenize the corpus into train/val shards; the folder also carries its tokenizer.

    Written in place into its stable folder: `prepare_shards` keeps a manifest of finished shards,
    so a killed run resumes after the last one; only a complete manifest is a result.
    """
    tok = tk.load_tokenizer(tokenizer["dir"])
    if tok.sha256 != tokenizer["sha256"]:
        raise CheckpointError("tokenizer changed since it was trained", tokenizer["dir"], "rerun with --refresh")
    docs = sources.read_jsonl_documents(_verified(corpus["path"], corpus["sha256"], "corpus"))
    out = _fresh(Path(workdir), fresh)
    with _Work() as w:
        tok.save(out / "tokenizer")
        manifest = shards_mod.prepare_shards(docs, tok, out, shard_tokens=config.data.shard_tokens,
                                             val_fraction=config.data.val_fraction, num_proc=config.data.num_proc,
                                             source=config.data.source)
    _log_artifact(track, out / "manifest.json")
    splits = manifest["splits"]
    return {"dir": str(out), "sha256": sha256_file(out / "manifest.json"), "train_tokens": splits["train"]["tokens"],
            "files": file_digests(out, ["manifest.json", "tokenizer/tokenizer.json"], store),
            "val_tokens": splits["val"]["tokens"], "work_seconds": w.seconds, "run_id": track and track["run_id"]}


def _model_result(summary: dict, track: dict | None, work: Path, published: Path, store: str, extra: dict) -> dict:
    """Publish the engine's final/ as this key's result (hard links), plot the curves; log the plot,
    and the folder as the run's logged MLflow model (pyfunc, its artifact "model")."""
    from gptcore.metrics import read_metrics
    from gptcore.model.folder import model_sha256

    final = link_tree(summary["final_dir"], published)
    rows = read_metrics(work / "metrics.jsonl")
    plot = tracking.plot_curves(rows, work / "loss.png", title=work.parent.name)
    if plot:  # the model folder itself is stored once: inside the logged MLflow model below
        _log_artifact(track, plot)
    result = {k: v for k, v in _numbers(summary).items()}
    result.update(dir=str(final), sha256=model_sha256(final), files=folder_digests(final, store),
                  run_id=track and track["run_id"], **extra)
    c, run_id = _client(track)
    if c is not None:  # the MLflow model (pyfunc) that the registry versions and `mlflow models serve` runs
        result["model_id"] = tracking.log_pyfunc_model(c, run_id, final, tags={"model_sha256": result["sha256"]})
    return result


def _tracked(config: Config, track: dict | None, engine: str, args: list, out: Path) -> tuple[dict, dict]:
    """Run a training engine (in this process, or on every rank under torchrun: `launch.run_engine`)
    with its per-step metrics batched into MLflow as they are written, and MLflow's system metrics
    (CPU, memory, GPU) sampled beside them. Logs where it ran as params: world_size, nnodes, device, dtype.

    Returns its summary and the seconds spent in the engine's own work and in tracking."""
    from gptcore.training import launch  # no torch until a rank is really started

    c, run_id = _client(track)
    buf = tracking.MetricBuffer(c, run_id, every=config.tracking.log_every)
    total = config.train.max_steps if engine == "pretrain" else config.finetune.max_steps
    callbacks = [buf, StageProgress(stage_logger(), engine, total)]  # progress lines in Prefect's logs (--watch)
    try:
        with tracking.system_metrics(track), _Work() as w:
            if config.train.nnodes > 1:  # one deployment run per node (tasks/nodes.py)
                summary = nodes.run_on_nodes(engine, config, args, out, callbacks=callbacks)
            else:
                summary = launch.run_engine(engine, config, args, out, callbacks=callbacks)
    finally:  # Ctrl-C, SIGTERM, a failure: the rows since the last batch still reach MLflow
        buf.flush()
    if c is not None:
        tracking.log_params(c, run_id, {k: summary.get(k) for k in ("world_size", "nnodes", "device", "dtype")})
    return summary, {"work_seconds": w.seconds - buf.seconds, "tracking_seconds": buf.seconds}


@task(name="pretrain", retries=1, retry_condition_fn=_retry_unless_user_error, **CACHED)
@_one_line
def pretrain(config: Config, key: str, store: str, workdir: str, shards: dict, track: dict | None = None,
             fresh: bool = False) -> dict:
    """Pre-train in the lineage's stable folder: a retry, or a larger max_steps, resumes from its newest checkpoint."""
    _verified(Path(shards["dir"]) / "manifest.json", shards["sha256"], "shard manifest")
    published = artifact_dir(store, "pretrain", key)
    out = _fresh(Path(workdir), fresh, published)
    summary, timings = _tracked(config, track, "pretrain", [shards["dir"]], out)
    return _model_result(summary, track, out, published, store, timings)


@task(name="evaluate", **CACHED)
@_one_line
def evaluate(config: Config, key: str, store: str, model: dict, shards: dict, track: dict | None = None) -> dict:
    """Validation loss and bits per byte beside the unigram baseline, plus sample generations."""
    from gptcore.evaluation import evaluate as ev

    tasks_ = list(dict.fromkeys([*config.eval.tasks, "samples"]))
    out = artifact_dir(store, "evaluate", key)
    with atomic_dir(out) as tmp, _Work() as w:
        res = ev.evaluate_checkpoint(model["dir"], shards["dir"], config=config, tasks=tasks_, out_file=tmp / "eval.json")
        atomic_write_text(tmp / "eval.txt", ev.format_report(res) + "\n")
        atomic_write_text(tmp / "samples.txt", ev.format_samples(res))
    for name in ("eval.json", "eval.txt", "samples.txt"):
        _log_artifact(track, out / name)
    val = res["tasks"].get("val", {})
    result = _numbers(val)
    if "val_bpb" in val and val.get("unigram_bpb"):
        result["bpb_vs_unigram"] = val["val_bpb"] / val["unigram_bpb"]  # < 1: the model beats the baseline
    if "code" in res["tasks"]:  # the fraction of samples that are valid Python
        result["parse_rate"] = res["tasks"]["code"]["parse_rate"]
    for name, r in res["tasks"].items():  # multiple-choice accuracies
        if isinstance(r, dict) and "acc" in r:
            result[f"{name}.acc"] = r["acc"]
    result.update(dir=str(out), files=folder_digests(out, store), work_seconds=w.seconds, run_id=track and track["run_id"])
    return result


@task(name="finetune", retries=1, retry_condition_fn=_retry_unless_user_error, **CACHED)
@_one_line
def finetune(config: Config, key: str, store: str, workdir: str, model: dict, track: dict | None = None,
             fresh: bool = False) -> dict:
    """LoRA (or full) fine-tuning of the pre-trained model, resumable in its lineage's stable folder."""
    published = artifact_dir(store, "finetune", key)
    out = _fresh(Path(workdir), fresh, published)
    summary, timings = _tracked(config, track, "finetune", [model["dir"]], out)
    for name in ("samples.txt", "confusion.txt", "eval.json"):
        _log_artifact(track, out / name)
    if summary.get("adapter_dir"):
        _log_artifact(track, summary["adapter_dir"], "adapter")
    return _model_result(summary, track, out, published, store, {"task": str(summary.get("task", "")), **timings})


@task(name="register")
@_one_line
def register(config: Config, models: dict[str, dict], track: dict | None = None) -> dict:
    """Register each model's MLflow model (a pyfunc: tasks/pyfunc_model.py) as a version (alias
    `candidate`) and run the promotion gate.

    `models` maps registered-model name -> (result of its stage, gate metric). Not cached: the
    registry itself is the state; a model already registered (same sha256) is reused, not duplicated.
    """
    c, run_id = _client(track)
    if c is None:
        return {"skipped": "tracking disabled"}
    out: dict[str, Any] = {"run_id": run_id, "new_versions": 0}
    decisions = []
    for name, (res, metric) in models.items():
        if not isinstance(res.get(metric), (int, float)):
            decisions.append(f"{name}: not registered (no {metric})")
            continue
        model_id = _logged_model(c, res, track)
        value = float(res[metric])
        version, new = tracking.register_version(c, name, model_id, res.get("run_id") or run_id, res["sha256"], metric, value,
                                                 recipe=recipe_hash(config), like=measured_on(config, res, metric))
        promoted, reason = tracking.promotion_gate(c, name, version, metric, value, seeds=config.tracking.gate_seeds,
                                                   p=config.tracking.gate_p, recipe=recipe_hash(config))
        out[f"{name}.version"] = int(version)
        out["new_versions"] += int(new)
        decisions.append(f"{name} v{version}: {reason}")
    text = "\n".join(decisions) + "\n"
    c.log_text(run_id, text, "promotion.txt")
    tracking.set_tags(c, run_id, {"promotion": text.strip()[:5000]})
    out["decisions"] = decisions
    return out


def measured_on(config: Config, res: dict, metric: str) -> dict[str, str]:
    """What a model's gate `metric` was measured on, as short hashes the gate compares (tasks/tracking.py
    `comparable`): two versions compare only when every part agrees.

    val_bpb (bits per byte) is tokenizer-free: the same validation text (corpus sha256, val_fraction)
    measured the same way (eval.batches, the model's context). A fine-tuning loss is nats per token:
    the same dataset by content (a file's sha256, else the built-in's name; max_examples, task),
    the same tokenizer (the model folder's), and the same evaluation (batches × batch size, max_len)."""
    from gptcore.reads import view_hash
    from tasks.caching import input_digests, store_root

    f = config.finetune
    meta = _read_json(Path(res["dir"]) / "config.json")
    block = (meta.get("config") or {}).get("block_size", config.model.block_size)
    if metric == "val_bpb":
        return {"dataset": view_hash({"corpus": res.get("val_text"), "val_fraction": config.data.val_fraction})[:16],
                "eval": view_hash({"batches": config.eval.batches, "block_size": block})[:16]}
    files = input_digests(finetuning.READS, config, store_root(config))
    data = {"content": list(files)} if files else {"name": f.dataset}
    tok = _read_json(Path(res["dir"]) / "tokenizer" / "tokenizer.json").get("sha256")
    return {"dataset": view_hash({**data, "max_examples": f.max_examples, "task": f.task})[:16],
            "tokenizer": view_hash({"tokenizer": tok})[:16],
            "eval": view_hash({"batches": f.eval_batches, "batch_size": f.batch_size, "max_len": f.max_len or block})[:16]}


def _read_json(path: Path) -> dict:
    import json

    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def recipe_hash(config: Config) -> str:
    """What makes two registered models seeds of one recipe: every key any stage's result reads, but `run.seed`."""
    from gptcore.reads import view_hash

    view = {k: v for st in STAGES.values() if st.reads for k, v in st.reads.result_view(config).items()}
    view.pop("run.seed", None)
    return view_hash(view)[:16]


def _logged_model(c, res: dict, track: dict) -> str:
    """The MLflow model (pyfunc) of a stage's folder: the one its stage logged, else log it here now
    (a result cached from another tracking store, or from before models were logged)."""
    if res.get("model_id"):
        try:
            c.get_logged_model(res["model_id"])
            return res["model_id"]
        except Exception:
            pass  # that model is not in this tracking store
    return tracking.log_pyfunc_model(c, track["run_id"], res["dir"], tags={"model_sha256": res["sha256"]})


# --------------------------------------------------------------------------------------------
# one record per stage: what the runner needs to know


@dataclass(frozen=True)
class Stage:
    name: str
    task: Any  # the Prefect task
    reads: Reads | None  # the config keys its result depends on; None: not cached (the registry is its state)
    code: tuple[str, ...] = ()  # the gptcore packages it runs: an edit there recomputes it
    resumable: bool = False  # trains in a stable folder per lineage and resumes there
    intact: Callable[[dict], tuple[str, str] | None] = lambda r: None  # checks of a cache hit beyond its files' sha256
    summary: Callable[[dict], str] = lambda r: ""  # the one figure the summary table shows

    @property
    def cached(self) -> bool:
        return self.reads is not None


def _shards_intact(r: dict) -> tuple[str, str] | None:
    """Every shard the manifest lists is there with the header and size it was written with. (Its
    sha256 is checked when a loader first opens it: data/sharding.py open_shard.)"""
    import json

    from gptcore.data.shards import read_shard_header

    manifest = json.loads((Path(r["dir"]) / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split.get("shards", []):
            path = Path(r["dir"]) / entry["file"]
            try:
                n, _ = read_shard_header(path)
            except DataError:
                n = None
            if n != entry["tokens"]:
                return ("corrupt" if path.is_file() else "missing"), str(path)
    return None


def _f(r: dict, k: str, fmt: str = "{:.4f}") -> str:
    return fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "?"


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("download", download, sources.READS, ("data",),
          summary=lambda r: f"{_f(r, 'bytes', '{:,}')} bytes, {_f(r, 'documents', '{:,}')} docs"),
    Stage("train_tokenizer", train_tokenizer, tk.READS, ("tokenizer",),
          summary=lambda r: f"vocab {_f(r, 'vocab_size', '{:,}')}"),
    Stage("shard", shard, shards_mod.READS, ("data", "tokenizer"), resumable=True, intact=_shards_intact,
          summary=lambda r: f"{_f(r, 'train_tokens', '{:,}')} train / {_f(r, 'val_tokens', '{:,}')} val tokens"),
    Stage("pretrain", pretrain, training.READS, ("training", "model", "data", "evaluation", "tokenizer"), resumable=True,
          summary=lambda r: f"val bpb {_f(r, 'val_bpb')}, train loss {_f(r, 'train_loss')}"
                            + (f", resumed from step {r['resumed_from_step']:.0f}" if "resumed_from_step" in r else "")),
    Stage("evaluate", evaluate, evaluation.READS, ("evaluation", "model", "data", "tokenizer"),
          summary=lambda r: f"val bpb {_f(r, 'val_bpb')} vs unigram {_f(r, 'unigram_bpb')}"
                            + (f", parse rate {_f(r, 'parse_rate', '{:.2f}')}" if "parse_rate" in r else "")),
    Stage("finetune", finetune, finetuning.READS, ("finetuning", "training", "model", "data", "tokenizer"), resumable=True,
          summary=lambda r: f"val loss {_f(r, 'val_loss_before')} -> {_f(r, 'val_loss_after')}"
                            + (f", acc {_f(r, 'accuracy')}" if "accuracy" in r else "")),
    Stage("register", register, None,
          summary=lambda r: "; ".join(r.get("decisions", [])) or r.get("skipped", "")),
)}
