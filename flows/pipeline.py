"""The gptcore pipeline, as Prefect flows — read `pipeline` below as the table of contents.

    download -> train_tokenizer -> shard -> pretrain -> evaluate -> finetune -> register

Each stage is a cached task (its record in tasks/stages.py: STAGES) keyed by content (tasks/caching.py), logged as a
nested MLflow run under one "pipeline" run (tasks/tracking.py). `pretrain_flow`, `evaluate_flow`
and `finetune_flow` are sub-flows: the pipeline calls them, and each can be called on its own with
a `ctx` and the upstream results. `gptcore run` calls `run_pipeline`; deployments (prefect.yaml)
run `pipeline` on a worker.
"""

from __future__ import annotations

import tasks  # noqa: F401  (offline defaults before prefect/mlflow)
from prefect import flow

from flows import timeline
from flows.runner import PipelineRun, check_until, quiet_prefect, run_stage
from gptcore.config import load_config
from gptcore.errors import environment_errors


@flow(name="gptcore-pipeline")
def pipeline(config_path: str = "configs/tiny.yaml", overrides: list[str] | None = None,
             until: str = "register", refresh: bool = False, base: str | None = None,
             parent_run_id: str | None = None) -> dict:
    """The whole chain on one config; stops after `until`; `refresh` recomputes every stage.

    `parent_run_id`: an MLflow run (a sweep's) the "pipeline" run nests under.
    `base`: a model folder to fine-tune instead of pre-training one (e.g. imported GPT-2 XL);
    then only finetune and register run.
    """
    timeline.mark("flow: pipeline body")
    cfg = load_config(config_path, overrides or [])
    with environment_errors(), PipelineRun(cfg, check_until(until), refresh, config_path, parent_run_id) as run:
        if base:
            model = run.given_model(base)
        else:
            corpus = run.stage("download")
            tokenizer = run.stage("train_tokenizer", corpus=corpus)
            shards = run.stage("shard", corpus=corpus, tokenizer=tokenizer)
            model = run.subflow(pretrain_flow, shards=shards)
            scores = run.subflow(evaluate_flow, model=model, shards=shards)
            model = dict(model, val_bpb=scores["val_bpb"], val_text=corpus["sha256"])  # the gate: bpb on this text
        tuned = run.subflow(finetune_flow, model=model)
        run.stage("register", models={
            "gptcore-pretrained": (model, "val_bpb"),        # gate: validation bits per byte
            "gptcore-finetuned": (tuned, "val_loss_after"),  # gate: fine-tuning validation loss
        })
    timeline.mark("flow: pipeline body done")
    return run.report()


@flow(name="pretrain")
def pretrain_flow(ctx: dict, shards: dict) -> dict:
    """Pre-train the model on prepared shards (resumes from the newest checkpoint on retry)."""
    return run_stage(ctx, "pretrain", shards=shards)


@flow(name="evaluate")
def evaluate_flow(ctx: dict, model: dict, shards: dict) -> dict:
    """Validation loss / bits per byte vs the unigram baseline, and sample generations."""
    return run_stage(ctx, "evaluate", model=model, shards=shards)


@flow(name="finetune")
def finetune_flow(ctx: dict, model: dict) -> dict:
    """LoRA fine-tuning of the pre-trained model on `finetune.dataset`."""
    return run_stage(ctx, "finetune", model=model)


def open_tracking(config_path: str, overrides: list[str] | None = None) -> None:
    """Open the config's MLflow store ahead of the flow (the first client costs ~1 s: imports and the
    sqlite schema check), so `gptcore run` does it while the Prefect server is still starting.
    MLflow keeps the opened store per URI, so the clients `PipelineRun` and the stages make are free."""
    from tasks import tracking

    cfg = load_config(config_path, overrides or [])
    if cfg.tracking.enabled:
        uri = tracking.tracking_uri(cfg)
        with environment_errors(uri):
            tracking.client(uri)


def run_pipeline(config_path: str, overrides: list[str] | None = None, until: str = "register",
                 refresh: bool = False, quiet: bool = True, base: str | None = None) -> dict:
    """Run `pipeline` here (a temporary Prefect server unless PREFECT_API_URL is set); the report.

    `quiet`: Prefect's console shows warnings only, and no tracebacks for user errors. Flow-run
    heartbeats are off: they detect crashed runs for a worker (there is none here), and each flow
    would wait up to a second at its end for the heartbeat thread.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if quiet:
        quiet_prefect()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return pipeline(config_path=config_path, overrides=list(overrides or []), until=until, refresh=refresh,
                        base=base)

