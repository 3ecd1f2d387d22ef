"""MLflow for the pipeline: runs, batched metrics, plots, and the model registry's promotion gate.

Layout of one pipeline run in MLflow:

    experiment <config name>
      run "pipeline"                 params: the whole config, flattened; key metrics of every stage
        run "download" ... "register"  one nested run per stage (tag mlflow.parentRunId)

Every run carries the Prefect flow-run id as tag `prefect.flow_run_id`. MLflow's "active run" is
per thread and Prefect runs tasks wherever it likes, so nothing here uses `mlflow.start_run`:
run ids are passed around explicitly and everything goes through one `MlflowClient`.

Per-step training metrics arrive through the engines' callbacks `cb(event, row)` and are buffered:
one `log_batch` call per `tracking.log_every` rows keeps tracking under a few % of training time.
"""

from __future__ import annotations

import contextlib

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import tasks  # noqa: F401  (offline defaults first)
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks import owners
from tasks.caching import file_lock
from tasks.tracking_store import DEFAULT_URI, tracking_uri  # noqa: F401  (their home; re-exported)

# MLflow 3's UI opens an experiment by its kind: GenAI (traces, "Evaluations") unless this tag says
# model training. Values as in MLflow's UI source (ExperimentKind); "custom_model_development" is the
# kind that maps to the classic runs view (workflowType=machine_learning).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def client(uri: str) -> MlflowClient:
    """A client for `uri`. A new sqlite store is created under a file lock: MLflow's table creation
    is not safe when two processes create the same store at once."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    with file_lock(uri[len("sqlite:///"):] + ".lock"):
        return MlflowClient(tracking_uri=uri)  # connects, creating the tables if needed


def experiment_id(c: MlflowClient, name: str) -> str:
    """Get or create the experiment `name` (safe when two runs create it at the same time), marked
    as a model-training experiment so MLflow's UI opens it on its runs (an older one is marked now)."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=_artifact_location(c, name),
                                       tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            exp = c.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def ui_url(base: str, experiment: str, run_id: str | None = None) -> str:
    """The page of `run_id` (else of `experiment`) in MLflow 3's classic runs view at `base`
    (http://host:port). Without `workflowType` the UI may open its GenAI view, whatever the tag says."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment}" + (f"/runs/{run_id}" if run_id else "")
    return page + "?workflowType=machine_learning"


def ui_base(environ=os.environ) -> str:
    """Where `make ui` serves: http://127.0.0.1:$PORT (default 5000)."""
    return f"http://127.0.0.1:{environ.get('PORT') or 5000}"


def _artifact_location(c: MlflowClient, name: str) -> str | None:
    """For a sqlite store, `mlruns/<experiment>/` beside the database file (MLflow's own default is
    `./mlruns/<id>` in whatever folder the process happens to run in); other stores: the server's."""
    uri = str(getattr(c, "tracking_uri", "") or "")
    if not uri.startswith("sqlite:///"):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / folder).as_uri()


def start_run(c: MlflowClient, exp_id: str, name: str, parent: str | None = None, tags: dict | None = None) -> str:
    """A new RUNNING run, tagged with its owner process (tasks/owners.py: a dead owner's runs get closed)."""
    tags = {**owners.owner_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = c.create_run(exp_id, run_name=name, tags=tags).info.run_id
    _OPEN[run_id] = c
    return run_id


_OPEN: dict[str, MlflowClient] = {}  # the runs this process started and has not ended


def end_run(c: MlflowClient, run_id: str, status: str) -> None:
    """End `run_id` as FINISHED, FAILED or KILLED."""
    c.set_terminated(run_id, status)
    _OPEN.pop(run_id, None)


def end_open_runs(reason: str) -> int:
    """KILLED for every run this process started and has not ended (a forced exit: `gptcore run`'s
    shutdown deadline), with `reason` as tag gptcore.killed_reason; how many. Best effort."""
    n = 0
    for run_id, c in list(_OPEN.items()):
        with contextlib.suppress(Exception):
            c.set_tag(run_id, owners.REASON, reason)
            end_run(c, run_id, "KILLED")
            n += 1
    return n


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0, tags: dict | None = None) -> None:
    """Log the finite numbers of `metrics` (others are skipped), and `tags`, in one call."""
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _finite(v)]
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    if items or tag_items:
        c.log_batch(run_id, metrics=items, tags=tag_items)


def set_tags(c: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class MetricBuffer:
    """An engine callback `cb(event, row)` that batches "log"/"eval" rows into MLflow metrics.

        buf = MetricBuffer(client, run_id, every=10)
        pretrain(cfg, data_dir, out_dir, callbacks=[buf])   # rows -> log_batch every 10 rows
        buf.flush()

    Every finite number of a row except `step` becomes a metric at that step. `rows` keeps what was
    seen (for the loss-curve plot).
    """

    def __init__(self, c: MlflowClient | None, run_id: str | None, every: int = 10):
        self.c, self.run_id, self.every = c, run_id, every
        self.pending: list[Metric] = []
        self.rows: list[tuple[str, dict]] = []
        self.n_rows = 0
        self.seconds = 0.0  # time spent here: what tracking cost the training loop

    def __call__(self, event: str, row: dict) -> None:
        t0 = time.perf_counter()
        try:
            self._add(event, row)
        finally:
            self.seconds += time.perf_counter() - t0

    def _add(self, event: str, row: dict) -> None:
        if event not in ("log", "eval"):
            if event == "end":
                self._flush()
            return
        self.rows.append((event, dict(row)))
        step, ts = int(row.get("step", 0)), int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in row.items() if k != "step" and _finite(v)]
        self.n_rows += 1
        if self.n_rows % self.every == 0:
            self._flush()

    def flush(self) -> None:
        t0 = time.perf_counter()
        self._flush()
        self.seconds += time.perf_counter() - t0

    def _flush(self) -> None:
        if self.c is not None and self.run_id and self.pending:
            for i in range(0, len(self.pending), 1000):  # MLflow's per-batch metric limit
                self.c.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending = []


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=100)


def _save(fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, legend and grid the axes, write the PNG (its folder made), close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(rows: list[dict], path: str | Path, title: str = "loss") -> Path | None:
    """Training loss (and validation loss where present) against step, as a PNG. None if no rows."""
    train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in rows if _finite(r.get("val_loss"))]
    if not train and not val:
        return None
    fig, ax = _figure((6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    return _save(fig, ax, path, "step", "cross-entropy (nats/token)", title)


def plot_variant_curves(curves: dict[str, list[tuple[int, list[tuple[int, float]]]]], path: str | Path,
                        ylabel: str) -> Path | None:
    """One colour per variant, one line per seed: {variant: [(seed, [(step, value), ...]), ...]} as a PNG."""
    if not any(points for runs in curves.values() for _, points in runs):
        return None
    fig, ax = _figure((7, 4.5))
    for i, (variant, runs) in enumerate(curves.items()):
        for j, (_seed, points) in enumerate(runs):
            if points:
                ax.plot(*zip(*points), "o-", color=f"C{i}", alpha=0.8, label=variant if j == 0 else None)
    return _save(fig, ax, path, "step", ylabel, f"{ylabel} per variant (one line per seed)")


# --------------------------------------------------------------------------------------------
# the model registry


LIKE = "gptcore.like."  # tag prefix of what a version's gate metric was measured on (see `comparable`)


def register_version(c: MlflowClient, name: str, model_id: str, run_id: str, sha256: str, metric: str, value: float,
                     recipe: str | None = None, like: dict[str, str] | None = None) -> tuple[str, bool]:
    """A version of registered model `name` for the logged model `model_id` holding the weights
    `sha256`: reused if a version of those weights exists (→ False).

    `recipe`: a hash of the config without its seed (tag `gptcore.recipe`): versions sharing it are
    seeds of one recipe, the samples the statistical gate compares. `like`: what its `metric` was
    measured on ({"dataset": hash, "tokenizer": hash, "eval": hash}), tags `gptcore.like.<part>`."""
    like_tags = {LIKE + k: v for k, v in (like or {}).items()}
    try:
        c.create_registered_model(name, description="gptcore models; alias champion = best so far")
    except MlflowException:
        pass  # already exists
    for mv in c.search_model_versions(f"name='{name}'"):
        if mv.tags.get("model_sha256") == sha256:
            for k, v in like_tags.items():
                if mv.tags.get(k) != v:  # a cached rerun finds them set: no write
                    c.set_model_version_tag(name, mv.version, k, v)
            return str(mv.version), False
    # the logged model's own artifact location as source: a "models:/<id>" source would be resolved
    # by the store through the *global* tracking URI (MLflow 3.17), not this client's; the sqlite
    # store does not keep model_id either, so the version carries it as a tag
    source = c.get_logged_model(model_id).artifact_location
    tags = {"model_sha256": sha256, "model_id": model_id, metric: repr(value), **({"gptcore.recipe": recipe} if recipe else {}),
            **like_tags}
    mv = c.create_model_version(name, source=source, run_id=run_id, model_id=model_id, tags=tags)
    return str(mv.version), True


def _recipe_values(c: MlflowClient, name: str, metric: str, recipe: str | None, mv=None) -> list[float]:
    """The `metric` of every version of `name` tagged with `recipe` (or just `mv`'s, untagged)."""
    if recipe is None:
        return [float(mv.tags[metric])] if mv is not None and metric in mv.tags else []
    return [float(v.tags[metric]) for v in c.search_model_versions(f"name='{name}'")
            if v.tags.get("gptcore.recipe") == recipe and metric in v.tags]


def comparable(candidate: dict[str, str], champion: dict[str, str]) -> str | None:
    """None when two versions' `gptcore.like.*` tags agree (their gate metrics compare), else the
    part that differs ("dataset", "tokenizer", "eval"). A champion that records none compares with nothing."""
    parts = {k[len(LIKE):]: v for k, v in candidate.items() if k.startswith(LIKE)}
    theirs = {k[len(LIKE):]: v for k, v in champion.items() if k.startswith(LIKE)}
    for part in ("dataset", "tokenizer", "eval", *sorted(set(parts) - {"dataset", "tokenizer", "eval"})):
        if parts.get(part) != theirs.get(part):
            return part
    return None


def promotion_gate(c: MlflowClient, name: str, version: str, metric: str, value: float, seeds: int = 1,
                   p: float = 0.05, recipe: str | None = None) -> tuple[bool, str]:
    """Move alias `champion` to `version` only if its `metric` (lower is better) beats the champion's —
    and only if the two were measured alike (`comparable`: the same data, tokenizer where the metric
    is per token, and evaluation); otherwise "no comparison: different <part>" and the champion stays.

    seeds = 1 (`tracking.gate_seeds`): this version's value against the champion's. seeds > 1: the
    values of every version of the candidate's `recipe` (its seeds) against those of the champion's
    recipe; it needs `seeds` of them, a lower mean, and Welch's one-sided p < `p` (`tracking.gate_p`).
    `candidate` always points at the newest version. Returns (promoted, reason); the reason is also
    written as tag `promotion` on the version.
    """
    c.set_registered_model_alias(name, "candidate", version)
    try:
        champ = c.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    differs = None
    if champ is not None and str(champ.version) != str(version):
        differs = comparable(c.get_model_version(name, version).tags, champ.tags)
    if differs is not None:
        promoted, reason = False, (f"no comparison: different {differs} (champion v{champ.version} was measured on "
                                   f"another {differs}); champion kept, v{version} is candidate")
    elif seeds > 1:
        promoted, reason = _statistical_gate(c, name, version, metric, seeds, p, recipe, champ)
    elif champ is None:
        promoted, reason = True, f"promoted: first champion ({metric}={value:.4f})"
    elif str(champ.version) == str(version):
        promoted, reason = False, f"kept: version {version} is already champion ({metric}={value:.4f})"
    else:
        best = float(champ.tags.get(metric, "inf"))
        promoted = value < best
        verb = "promoted" if promoted else "kept champion"
        sign = "<" if promoted else ">="
        reason = f"{verb}: {metric} {value:.4f} {sign} champion v{champ.version}'s {best:.4f}"
    if promoted:
        c.set_registered_model_alias(name, "champion", version)
    c.set_model_version_tag(name, version, "promotion", reason)
    return promoted, reason


def _statistical_gate(c: MlflowClient, name: str, version: str, metric: str, seeds: int, p_max: float,
                      recipe: str | None, champ) -> tuple[bool, str]:
    from gptcore.evaluation.stats import mean_std, welch_p

    cand = _recipe_values(c, name, metric, recipe, c.get_model_version(name, version))
    m, s = mean_std(cand)
    if len(cand) < seeds:
        return False, (f"kept: candidate recipe has {len(cand)} of the {seeds} seeds the gate needs "
                       f"(train more with --set run.seed=N)")
    if champ is None:
        return True, f"promoted: first champion ({metric} {m:.4f} ± {s:.4f} over {len(cand)} seeds)"
    champ_recipe = champ.tags.get("gptcore.recipe")
    if str(champ.version) == str(version) or (recipe is not None and champ_recipe == recipe):
        return False, f"kept: the champion v{champ.version} is this recipe ({metric} {m:.4f} ± {s:.4f})"
    base = _recipe_values(c, name, metric, champ_recipe, champ) or [float(champ.tags.get(metric, "inf"))]
    bm, bs = mean_std(base)
    pv = welch_p(cand, base, alternative="less")
    promoted = m < bm and pv < p_max
    verdict = "promoted" if promoted else "kept champion"
    return promoted, (f"{verdict}: {metric} {m:.4f} ± {s:.4f} (n={len(cand)}) vs champion v{champ.version}'s "
                      f"{bm:.4f} ± {bs:.4f} (n={len(base)}), Welch p={pv:.3g} {'<' if pv < p_max else '>='} {p_max}")


@contextlib.contextmanager
def system_metrics(track: dict | None, interval: float = 5.0):
    """MLflow's system metrics (CPU, memory, disk, network; GPU via nvidia-ml-py when an NVIDIA device
    is present) sampled every `interval` s into the run while the block runs: the "System metrics" tab."""
    if not track:
        yield
        return
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter on the console
    monitor = SystemMetricsMonitor(track["run_id"], sampling_interval=interval, tracking_uri=track["uri"])
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# --------------------------------------------------------------------------------------------
# the MLflow model (pyfunc) of a model folder


def pyfunc_signature():
    """Input: a column of prompts; output: a column of generated texts; params with their defaults."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from tasks.pyfunc_model import DEFAULTS

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),  # unnamed: predict(["a prompt", ...]) as is
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, DEFAULTS["max_new_tokens"]),
                            ParamSpec("temperature", DataType.double, DEFAULTS["temperature"]),
                            ParamSpec("top_k", DataType.long, DEFAULTS["top_k"])]))


def pip_requirements() -> list[str]:
    """What loading and running a model folder imports (gptcore itself travels as code)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "regex", "safetensors"]


def log_pyfunc_model(c: MlflowClient, run_id: str, model_dir: str | Path, name: str = "model",
                     tags: dict | None = None) -> str:
    """Log `model_dir` as an MLflow 3 logged model (pyfunc over gptcore's loader and generation)
    linked to run `run_id`; returns its model_id (`register_version` versions it).

    Saved locally with `mlflow.pyfunc.save_model` (this file's neighbour tasks/pyfunc_model.py as
    model-from-code, the folder as artifact "model", the gptcore package as code), then uploaded
    through the client: no active run, so it is safe in Prefect's worker threads."""
    import tempfile
    import warnings

    import mlflow.pyfunc
    from mlflow.entities import LoggedModelStatus

    import gptcore

    exp_id = c.get_run(run_id).info.experiment_id
    lm = c.create_logged_model(exp_id, name=name, source_run_id=run_id, tags=tags, model_type="gptcore")
    try:
        with tempfile.TemporaryDirectory(prefix="gptcore-pyfunc-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "add type hints" / "no input example": the signature is explicit
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(local, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                     artifacts={"model": str(model_dir)}, code_paths=[str(Path(gptcore.__file__).parent)],
                                     signature=pyfunc_signature(), pip_requirements=pip_requirements(),
                                     metadata={"gptcore_model_dir": str(model_dir)})
            c.log_model_artifacts(lm.model_id, str(local))
    except BaseException:
        c.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
        raise
    c.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    return lm.model_id
