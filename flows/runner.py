"""How the pipeline runs one stage: key, lock, Prefect task (cache hit or work), MLflow run, summary row.

    key     = stage_key(stage, config, sha256 of every upstream result passed in, its gptcore code)
    lineage = lineage_key(...)                         # resumable stages: the training run it continues
    lock    = stage_lock(store, stage, lineage)        # a concurrent run waits here, then hits the cache
    state  = task(..., return_state=True)             # Prefect: "Cached" or computed
    MLflow = nested run "stage" under the pipeline run: key metrics, cached?, where its artifacts are

`ctx` is a plain dict (the typed Config, the store, MLflow ids) so sub-flows can take it as a parameter.
What the runner knows of each stage comes from one record, `tasks.stages.STAGES`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import tasks  # noqa: F401  (offline defaults first)
from prefect.runtime import flow_run

from flows import timeline
from gptcore.config import Config
from gptcore.errors import GptcoreError, environment_error, environment_errors
from tasks import owners, tracking
from tasks.caching import damaged, input_digests, lineage_key, run_dir, stage_key, stage_lock, store_root
from tasks.stages import STAGES


class Reached(Exception):
    """Raised after the `--until` stage; the pipeline run ends there, successfully."""


def _flow_run_id() -> str:
    return str(flow_run.get_id() or "")


MODEL_STAGES = ("pretrain", "finetune")  # the stages whose result is a model folder, named in the summary


def _numbers(d: dict) -> dict[str, float]:
    return {k: v for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


_PARENT_METRICS: dict[str, dict] = {}  # parent run id -> stage figures not yet written to it


def flush_parent_metrics(c, parent_run_id: str) -> None:
    """Write the parent run's pending stage figures ("pretrain.val_bpb", ...) in one log_batch."""
    pending = _PARENT_METRICS.pop(parent_run_id, None)
    if pending:
        tracking.log_metrics(c, parent_run_id, pending)


def run_stage(ctx: dict, name: str, **inputs: Any) -> dict:
    """Run stage `name` (its record in tasks.stages.STAGES); returns its result plus `_row` for the summary.
    A full disk or a read-only store, here or in MLflow, leaves as one `SetupError` line."""
    with environment_errors():
        return _run_stage(ctx, name, **inputs)


def _run_stage(ctx: dict, name: str, **inputs: Any) -> dict:
    timeline.mark(f"stage {name}: start")
    stage = STAGES[name]
    cfg: Config = ctx["config"]
    upstream = tuple(v["sha256"] for v in inputs.values() if isinstance(v, dict) and "sha256" in v)
    if stage.cached:  # the files its config names (a dataset, a files: glob, a tokenizer folder), by content
        upstream += input_digests(stage.reads, cfg, ctx["store"])
    key = stage_key(name, stage.reads, cfg, upstream, stage.code) if stage.cached else "registry"
    lineage = lineage_key(name, stage.reads, cfg, upstream, stage.code) if stage.resumable else key
    c = tracking.client(ctx["uri"]) if ctx.get("uri") else None
    run_id = None
    if c is not None:
        run_id = tracking.start_run(c, ctx["experiment_id"], name, parent=ctx["parent_run_id"],
                                    tags={"prefect.flow_run_id": _flow_run_id(), "gptcore.stage": name,
                                          "gptcore.cache_key": key, "gptcore.lineage": lineage})
    timeline.mark(f"stage {name}: key and MLflow run")
    kwargs = dict(config=cfg, track={"uri": ctx["uri"], "run_id": run_id} if run_id else None, **inputs)
    if stage.cached:
        kwargs.update(key=key, store=ctx["store"])
    if stage.resumable:
        kwargs.update(workdir=str(run_dir(ctx["store"], name, lineage)))

    def call(refresh: bool, fresh: bool) -> tuple[dict, bool]:
        opts = dict(result_storage=Path(ctx["store"]) / "results", refresh_cache=refresh) if stage.cached else {}
        extra = {"fresh": fresh} if stage.resumable else {}
        state = stage.task.with_options(**opts)(**kwargs, **extra, return_state=True)
        return state.result(), state.name == "Cached"

    t0 = time.perf_counter()
    try:
        with stage_lock(ctx["store"], name, lineage):
            result, cached = call(ctx["refresh"], fresh=ctx["refresh"])
            bad = cached and (damaged(result, ctx["store"]) or stage.intact(result))
            if bad:  # recompute it, resuming from its training folder's checkpoints (never emptying it)
                print(f"[gptcore] {name}: cached result is {bad[0]} ({bad[1]}): recomputing", file=sys.stderr, flush=True)
                result, cached = call(True, fresh=False)
    except BaseException as exc:
        if c is not None:
            tracking.end_run(c, run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    seconds = time.perf_counter() - t0
    timeline.mark(f"stage {name}: task {'cached' if cached else 'computed'}")
    if c is not None:
        nums = _numbers(result)
        # one write: metrics (at the stage's last step, so a final val_loss joins the per-step series) and tags
        tracking.log_metrics(c, run_id, {**nums, "seconds": seconds}, step=int(nums.get("step", 0)),
                             tags={"gptcore.cached": str(cached).lower(), "gptcore.source_run_id": result.get("run_id") or ""})
        pending = _PARENT_METRICS.setdefault(ctx["parent_run_id"], {})
        pending.update({f"{name}.{k}": v for k, v in {**nums, "seconds": seconds}.items()})
        if not cached:  # a cache hit's figures wait for the next write: one batch for a run of hits
            flush_parent_metrics(c, ctx["parent_run_id"])
        tracking.end_run(c, run_id, "FINISHED")
    if name == "register":  # nothing new registered = the registry already had these models
        cached = result.get("new_versions", 1) == 0
    row = {"stage": name, "status": "cached" if cached else "computed", "seconds": round(seconds, 2),
           "metric": stage.summary(result), "run_id": run_id}
    print(f"[gptcore] {name}: {row['status']} in {seconds:.1f}s — {row['metric']}", file=sys.stderr, flush=True)
    timeline.mark(f"stage {name}: end")
    return {**result, "_row": row}


class PipelineRun:
    """The parent MLflow run of one pipeline run, the summary rows, and the `--until` stop.

        with PipelineRun(cfg, until, refresh) as run:
            corpus = run.stage("download", download)
            ...
        report = run.report()
    """

    def __init__(self, cfg: Config, until: str = "register", refresh: bool = False, config_path: str = "",
                 parent_run_id: str | None = None):
        self.until, self.rows, self.results, self.parent = until, [], {}, parent_run_id  # parent: e.g. a sweep's run
        self.models: dict[str, str] = {}  # stage -> the model folder it produced
        uri = tracking.tracking_uri(cfg) if cfg.tracking.enabled else None
        self.ctx = {"config": cfg, "store": str(store_root(cfg)), "refresh": refresh, "uri": uri,
                    "experiment": cfg.tracking.experiment or cfg.run.name, "experiment_id": None, "parent_run_id": None}
        self.c = tracking.client(uri) if uri else None
        self.config_path, self.cfg = config_path, cfg

    def __enter__(self) -> "PipelineRun":
        if self.c is not None:
            exp = tracking.experiment_id(self.c, self.ctx["experiment"])
            closed = owners.reconcile(self.c, exp)  # runs a killed gptcore left RUNNING
            if closed:
                print(f"[gptcore] marked {len(closed)} run(s) KILLED that a process which is gone left RUNNING",
                      file=sys.stderr, flush=True)
            run_id = tracking.start_run(self.c, exp, "pipeline", parent=self.parent, tags={
                "prefect.flow_run_id": _flow_run_id(), "gptcore.config_path": self.config_path,
                "gptcore.until": self.until, "gptcore.refresh": str(self.ctx["refresh"]).lower()})
            tracking.log_params(self.c, run_id, self.cfg.flat())
            self.ctx.update(experiment_id=exp, parent_run_id=run_id)
        timeline.mark("flow: pipeline run open in MLflow")
        return self

    def stage(self, name: str, **inputs: Any) -> dict:
        return self.record(run_stage(self.ctx, name, **inputs))

    def given_model(self, path: str) -> dict:
        """A model folder from outside the pipeline (to fine-tune), as if a stage had produced it."""
        from gptcore.model.folder import model_sha256

        return {"dir": str(Path(path).resolve()), "sha256": model_sha256(path), "run_id": None}

    def subflow(self, flow_fn: Callable, **inputs: Any) -> dict:
        return self.record(flow_fn(ctx=self.ctx, **inputs))

    def record(self, result: dict) -> dict:
        row = result.pop("_row")
        self.rows.append(row)
        self.results[row["stage"]] = {**_numbers(result), "run_id": result.get("run_id")}
        if row["stage"] in MODEL_STAGES and isinstance(result.get("dir"), str):
            self.models[row["stage"]] = result["dir"]
        if row["stage"] == self.until:
            raise Reached(row["stage"])
        return result

    def __exit__(self, etype, exc, tb) -> bool:
        if self.c is not None:
            run_id = self.ctx["parent_run_id"]
            flush_parent_metrics(self.c, run_id)
            if etype is None or etype is Reached:
                self.c.log_text(run_id, summary_markdown(self.rows), "summary.md")
                tracking.end_run(self.c, run_id, "FINISHED")
            else:
                tracking.end_run(self.c, run_id, "FAILED" if issubclass(etype, Exception) else "KILLED")
        return etype is Reached

    def report(self) -> dict:
        return {"rows": self.rows, "results": self.results, "models": self.models, "uri": self.ctx["uri"],
                "experiment": self.ctx["experiment"],
                "experiment_id": self.ctx["experiment_id"], "run_id": self.ctx["parent_run_id"],
                "store": self.ctx["store"]}


def end_open_runs(reason: str) -> int:
    """KILLED for the MLflow runs this process started and has not ended: the CLI's forced exit."""
    return tracking.end_open_runs(reason)


def summary_markdown(rows: list[dict]) -> str:
    out = "| stage | status | seconds | key metric |\n|---|---|---:|---|\n"
    return out + "".join(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {r['metric']} |\n" for r in rows)


def check_until(until: str) -> str:
    if until not in STAGES:
        from gptcore.errors import ConfigError

        raise ConfigError(f"unknown stage '{until}'", "--until", f"stages: {', '.join(STAGES)}")
    return until


def format_report(report: dict) -> str:
    """The summary table `gptcore run` ends with, and where to look in MLflow."""
    rows = report["rows"]
    w = max([len(r["stage"]) for r in rows] + [5])
    lines = [f"{'stage':<{w}}  {'status':<8}  {'time':>7}  key metric"]
    lines += [f"{r['stage']:<{w}}  {r['status']:<8}  {r['seconds']:>6.1f}s  {r['metric']}" for r in rows]
    total = sum(r["seconds"] for r in rows)
    lines.append(f"{'total':<{w}}  {'':<8}  {total:>6.1f}s")
    uri, exp, run_id = report.get("uri"), report.get("experiment_id"), report.get("run_id")
    if uri and uri.startswith("http"):
        lines += ["", f"MLflow: experiment '{report['experiment']}', open {tracking.ui_url(uri, exp, run_id)}"]
    elif uri:
        port = tracking.ui_base().rsplit(":", 1)[1]
        lines += [
            "",
            f"MLflow: experiment '{report['experiment']}', run {run_id} (store {uri})",
            f"  look at it:  make ui   (or: mlflow ui --backend-store-uri {uri} --port {port})",
            f"  then open    {tracking.ui_url(tracking.ui_base(), exp, run_id)}",
            "  registered models and their aliases (champion, candidate): the \"Model registry\" tab",
        ]
    models = report.get("models") or {}
    if models:
        lines += ["", "model folders (for gptcore generate, chat, serve, convert):"]
        lines += [f"  {stage:<{w}}  {_shown(path)}" for stage, path in models.items()]
    lines.append(f"artifacts and cache: {report['store']}")
    return "\n".join(lines)


def _shown(path: str) -> str:
    """`path` relative to the current folder when it lies below it (what a reader types next), else as is."""
    p, here = Path(path).resolve(), Path.cwd().resolve()
    return str(p.relative_to(here)) if p.is_relative_to(here) else str(p)


class _HideUserErrors(logging.Filter):
    """Drop Prefect's log records about a GptcoreError, a full disk or a signal: the CLI prints that as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, GptcoreError):
            return False
        if record.levelno >= logging.WARNING and environment_error(RuntimeError(record.getMessage())) is not None:
            return False  # e.g. "Failed to write result: [Errno 28] ...": the CLI's one line says it
        if record.levelno >= logging.ERROR:
            msg = record.getMessage()
            if "aborted by an interrupt signal" in msg or "aborted by a termination signal" in msg:
                return False  # Ctrl-C / SIGTERM: the CLI says "interrupted" / "terminated", once
            return not any(f"{n}(" in msg or f"{n}:" in msg for n in _user_error_names())
        return True


def _user_error_names(cls: type = GptcoreError) -> set[str]:
    return {cls.__name__}.union(*(_user_error_names(s) for s in cls.__subclasses__()))


def quiet_prefect(level: int = logging.WARNING) -> None:
    """Console: Prefect's warnings only (our own per-stage lines show progress), user errors hidden."""
    from prefect.logging.configuration import setup_logging

    setup_logging()
    logging.getLogger("prefect").setLevel(level)
    for h in logging.getLogger().handlers:
        h.addFilter(_HideUserErrors())
