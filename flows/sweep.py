"""`gptcore sweep`: one pipeline run per (grid cell × seed), compared with statistics.

    cells    = product of the --grid values × seeds run.seed, run.seed+1, ...   (each a list of --set overrides)
    sweep    = MLflow run "sweep"; each cell's "pipeline" run is its child (flows/pipeline.py, unchanged)
    parallel = K cells at once, each in its own process (Prefect's ProcessPoolTaskRunner): its own torch
               thread pool (train.num_threads, else cores / K) and its own RNG, so a cell is the same run
               it would be alone
    sharing  = every stage keys on what it reads (tasks/caching.py): a swept model.* key leaves download,
               tokenizer and shard keys unchanged, so one cell computes them and the others wait on its
               lock, then hit the cache. A rerun of the sweep hits the cache for every finished cell and
               computes only the missing ones.
    verdict  = per variant mean ± std over seeds of val bpb and fine-tune val loss, Welch's p against
               the first variant (gptcore/evaluation/stats.py); table.md + val_bpb.png on the sweep run

A failed cell is reported in the table and does not stop the others.
"""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import tasks  # noqa: F401  (offline defaults first)
from prefect import flow, task
from prefect.task_runners import ProcessPoolTaskRunner

from gptcore.config import load_config, parse_override
from gptcore.errors import ConfigError
from gptcore.evaluation.stats import mean_std, welch_p
from gptcore.processes import stop
from tasks import tracking
from tasks.caching import store_root


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["model.pos=learned,rope"] -> {"model.pos": ["learned", "rope"]}; each key section.key, once."""
    grid: dict[str, list[str]] = {}
    for item in items:
        (section, key), _ = parse_override(item.split(",", 1)[0])  # checks section.key=...
        name, values = f"{section}.{key}", [v.strip() for v in item.split("=", 1)[1].split(",")]
        if name == "run.seed":
            raise ConfigError("run.seed cannot be a grid key", "--grid", "use --seeds N")
        if name in grid or not all(values):
            raise ConfigError(f"grid key '{name}' repeated or with an empty value", "--grid", "write --grid KEY=V1,V2")
        grid[name] = values
    if not grid:
        raise ConfigError("no grid", "--grid", "pass at least one --grid section.key=V1,V2")
    return grid


def plan_cells(config_path: str, grid: dict[str, list[str]], seeds: int, overrides: list[str]) -> list[dict]:
    """Every (variant, seed) as {variant, seed, overrides}; each cell's config is validated here, before any work."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}", "--seeds", "pass 1 or more")
    base = load_config(config_path, overrides).run.seed
    cells = []
    for combo in itertools.product(*grid.values()):
        variant = " ".join(f"{k}={v}" for k, v in zip(grid, combo))
        for i in range(seeds):
            sets = [*overrides, *(f"{k}={v}" for k, v in zip(grid, combo)), f"run.seed={base + i}"]
            load_config(config_path, sets)  # a bad value is one error line now, not a failed cell later
            cells.append({"variant": variant, "seed": base + i, "overrides": sets})
    return cells


@task(name="sweep-cell")
def run_cell(config_path: str, overrides: list[str], until: str, parent_run_id: str | None, threads: int,
             worker: bool = True) -> dict:
    """One pipeline run, in a worker process of its own (torch threads set for it).

    Its stages commit their cache records eagerly: inside a task, Prefect would otherwise defer the
    nested tasks' commits to this task's end, and a parallel cell waiting on the tokenizer's lock
    would find no cache entry and train it again."""
    import torch
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.transactions import CommitMode, transaction

    from flows.pipeline import pipeline
    from flows.runner import quiet_prefect

    torch.set_num_threads(threads)
    if worker:  # a fresh process: Prefect's console as quiet as `gptcore run`'s; SIGTERM unwinds the cell
        quiet_prefect()
        signal.signal(signal.SIGTERM, _on_sigterm)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), transaction(commit_mode=CommitMode.EAGER):
        return pipeline(config_path=config_path, overrides=overrides, until=until, parent_run_id=parent_run_id)


def _api_url() -> str | None:
    """The Prefect API this flow talks to (the temporary server's, when none is configured), for the workers."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    return getattr(SubprocessASGIServer(), "api_url", None)


@flow(name="gptcore-sweep")
def sweep(config_path: str, grid: dict[str, list[str]], seeds: int = 2, overrides: list[str] | None = None,
          max_parallel: int | None = None, until: str = "register") -> dict:
    """Run the pipeline on every cell of grid × seeds, K at a time; a comparison table and plot on the sweep run."""
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    cells = plan_cells(config_path, grid, seeds, overrides)
    cores = os.cpu_count() or 1
    k = max_parallel or max(1, min(4, cores // (cfg.train.num_threads or 1)))
    k = max(1, min(k, len(cells)))
    threads = cfg.train.num_threads or max(1, cores // k)
    c = tracking.client(tracking.tracking_uri(cfg)) if cfg.tracking.enabled else None
    run_id = exp = None
    if c is not None:
        exp = tracking.experiment_id(c, cfg.tracking.experiment or cfg.run.name)
        run_id = tracking.start_run(c, exp, "sweep", tags={"gptcore.config_path": config_path, "gptcore.sweep": "true"})
        tracking.log_params(c, run_id, {"sweep.grid": grid, "sweep.seeds": seeds, "sweep.max_parallel": k,
                                        "sweep.threads_per_cell": threads, **cfg.flat()})
    outcomes = []
    params = [dict(config_path=config_path, overrides=cell["overrides"], until=until, parent_run_id=run_id,
                   threads=threads) for cell in cells]
    try:
        if k == 1:  # one at a time: each cell's pipeline is a sub-flow of this flow, in this process
            for cell, p in zip(cells, params):
                outcomes.append(_outcome(cell, lambda p=p: run_cell.fn(**p, worker=False)))
        else:
            url = _api_url()
            if url:  # spawned workers report to this flow's server instead of starting their own
                os.environ["PREFECT_API_URL"] = url
            with ProcessPoolTaskRunner(max_workers=k) as runner:
                try:
                    futures = [runner.submit(run_cell, parameters=p) for p in params]
                    outcomes += [_outcome(cell, fut.result) for cell, fut in zip(cells, futures)]
                except BaseException:  # Ctrl-C / SIGTERM: the runner's exit would wait for running cells
                    stop_workers(runner)
                    raise
    except BaseException:
        if c is not None:
            tracking.end_run(c, run_id, "KILLED")
        raise
    table = comparison(outcomes, list(dict.fromkeys(cell["variant"] for cell in cells)))
    if c is not None:
        _log_sweep(c, run_id, outcomes, table, store_root(cfg) / "sweeps")
        tracking.end_run(c, run_id, "FINISHED" if all("report" in o for o in outcomes) else "FAILED")
    return {"table": table, "cells": [{k_: v for k_, v in o.items() if k_ != "report"} | _cell_numbers(o)
                                      for o in outcomes], "run_id": run_id, "experiment_id": exp,
            "uri": tracking.tracking_uri(cfg) if c is not None else None, "max_parallel": k, "threads": threads}


def stop_workers(runner: ProcessPoolTaskRunner, grace: float = 10.0) -> None:
    """SIGTERM every worker process of `runner`, SIGKILL those still alive after `grace` seconds.

    ProcessPoolTaskRunner's exit cancels queued cells but waits for the running ones, which would
    let a stopped sweep train on for minutes. Each worker's SIGTERM ends its cell like a SIGTERM
    to `gptcore run` does (its stage runs are marked KILLED, its torchrun ranks stopped); the tree:
    a cell's ranks, if its worker needs the SIGKILL before its own stop is done, are killed too.
    The worker list is concurrent.futures' own (`_processes`): Prefect exposes no public handle."""
    executor = getattr(runner, "_executor", None)
    stop(list((getattr(executor, "_processes", None) or {}).values()), grace=grace, kill_wait=1, tree=True)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _outcome(cell: dict, result) -> dict:
    """The cell with its pipeline report, or with the error that stopped it (the sweep goes on)."""
    try:
        return {**cell, "report": result()}
    except Exception as exc:
        return {**cell, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def _cell_numbers(o: dict) -> dict:
    """val_bpb, fine-tune loss, the cached/computed status of each stage, and the pretrain run of one cell."""
    if "report" not in o:
        return {}
    res = o["report"]["results"]
    return {"val_bpb": res.get("evaluate", {}).get("val_bpb"), "parse_rate": res.get("evaluate", {}).get("parse_rate"),
            "finetune_loss": res.get("finetune", {}).get("val_loss_after"),
            "pretrain_run_id": res.get("pretrain", {}).get("run_id"), "pipeline_run_id": o["report"].get("run_id"),
            "statuses": {r["stage"]: r["status"] for r in o["report"]["rows"]}}


def comparison(outcomes: list[dict], variants: list[str]) -> list[dict]:
    """One row per variant: n, mean ± std of val bpb and fine-tune loss, Welch p vs the first variant, failures."""
    nums = [o | _cell_numbers(o) for o in outcomes]
    values = {v: {m: [o[m] for o in nums if o["variant"] == v and isinstance(o.get(m), (int, float))]
                  for m in ("val_bpb", "finetune_loss", "parse_rate")} for v in variants}
    first = variants[0]
    rows = []
    for v in variants:
        row = {"variant": v, "n": len(values[v]["val_bpb"]),
               "failed": sum(1 for o in nums if o["variant"] == v and "error" in o)}
        for m in ("val_bpb", "finetune_loss", "parse_rate"):
            row[m] = mean_std(values[v][m])
            row[f"{m}_p"] = None if v == first else welch_p(values[v][m], values[first][m])
        rows.append(row)
    return rows


def _pm(ms: tuple[float, float], digits: int = 4) -> str:
    m, s = ms
    return "-" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}" if s == s else f"{m:.{digits}f}"


def _p(p: float | None) -> str:
    return "(ref)" if p is None else "-" if p != p else f"{p:.3g}"


def format_table(table: list[dict], markdown: bool = False) -> str:
    """The comparison as a markdown table (MLflow's table.md) or aligned text (the CLI)."""
    head = ["variant", "n", "val bpb", "p", "finetune loss", "p", "parse rate", "failed"]
    body = [[r["variant"], str(r["n"]), _pm(r["val_bpb"]), _p(r["val_bpb_p"]), _pm(r["finetune_loss"]),
             _p(r["finetune_loss_p"]), _pm(r["parse_rate"], 2), str(r["failed"])] for r in table]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body]) + "\n"
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(n) for x, n in zip(row, w)).rstrip() for row in [head, *body])


def _log_sweep(c, run_id: str, outcomes: list[dict], table: list[dict], scratch: Path) -> None:
    """table.md, cells.md (every cell: seed, numbers, its pipeline run or its error) and val_bpb.png
    (drawn under `scratch/<run id>/`) on the sweep run."""
    note = ("p: Welch's two-sided t-test of the variant's seeds against the first variant's "
            "(gptcore/evaluation/stats.py); mean ± sample std over seeds.\n")
    c.log_text(run_id, format_table(table, markdown=True) + "\n" + note, "table.md")
    lines = ["| variant | seed | val bpb | finetune loss | pipeline run / error |", "|---|---:|---:|---:|---|"]
    for o in outcomes:
        n = _cell_numbers(o)
        lines.append(f"| {o['variant']} | {o['seed']} | {n.get('val_bpb') or '-'} | {n.get('finetune_loss') or '-'} | "
                     f"{n.get('pipeline_run_id') or o.get('error', '')} |")
    c.log_text(run_id, "\n".join(lines) + "\n", "cells.md")
    for r in table:
        for m in ("val_bpb", "finetune_loss", "parse_rate"):
            mean, _ = r[m]
            if mean == mean:  # metric names allow no "=": model.pos=rope -> model.pos:rope/val_bpb
                tracking.log_metrics(c, run_id, {f"{r['variant'].replace('=', ':')}/{m}": mean})
    curves: dict[str, list] = {}
    for o in outcomes:
        pre = _cell_numbers(o).get("pretrain_run_id")
        if pre:
            # the engine's evaluations; step 0 holds the stage's summary copy of the final value
            hist = sorted((m.step, m.value) for m in c.get_metric_history(pre, "val_bpb") if m.step > 0)
            curves.setdefault(o["variant"], []).append((o["seed"], hist))
    png = tracking.plot_variant_curves(curves, scratch / run_id / "val_bpb.png", "val bits per byte")
    if png:
        c.log_artifact(run_id, str(png))


def run_sweep(config_path: str, grid: dict[str, list[str]], seeds: int, overrides: list[str] | None = None,
              max_parallel: int | None = None, until: str = "register", quiet: bool = True) -> dict:
    """Run `sweep` here (a temporary Prefect server unless PREFECT_API_URL is set), like `run_pipeline`."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.runner import quiet_prefect

    if quiet:
        quiet_prefect()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return sweep(config_path=config_path, grid=grid, seeds=seeds, overrides=list(overrides or []),
                     max_parallel=max_parallel, until=until)
