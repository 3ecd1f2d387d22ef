"""Multi-node training from a pipeline stage: one `gptcore-node` flow run per node, through `run_deployment`.

Why this pattern: each node is a separate machine with its own Prefect worker (a `gpu` pool), and
Prefect's own way to run work on another machine is a deployment run. The stage creates one run
per node (`timeout=0`: start them all, then wait), each with its `train.node_rank`; torchrun on
each node joins the static rendezvous at `train.rdzv_endpoint` (node 0). The stage follows the
shared `metrics.jsonl` for live MLflow curves, waits until every node's run is final, and fails —
cancelling the others — when one fails, naming the node and its error. A Prefect retry of the
stage reruns every node, and they resume from the newest checkpoint with the same world size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from gptcore.errors import GptcoreError
from gptcore.training.launch import Callback, MetricsFollower, launch_dir_of


def run_on_nodes(engine: str, config, args: Sequence[str], out_dir: str | Path, callbacks: Sequence[Callback] = (),
                 poll: float = 2.0) -> dict:
    """Run `engine` on `train.nnodes` nodes as runs of `train.node_deployment`; node 0's summary."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    follower = MetricsFollower(out_dir / "metrics.jsonl", callbacks)
    follower.start()
    runs = []
    try:
        for rank in range(config.train.nnodes):
            node_cfg = config.model_copy(update={"train": config.train.model_copy(update={"node_rank": rank})})
            runs.append(run_deployment(config.train.node_deployment, timeout=0, as_subflow=False, parameters={
                "engine": engine, "config": node_cfg.model_dump(mode="json"), "args": [str(a) for a in args],
                "out_dir": str(out_dir)}))
        with get_client(sync_client=True) as client:
            pending = {r.id: rank for rank, r in enumerate(runs)}
            while pending:
                for run_id, rank in list(pending.items()):
                    state = client.read_flow_run(run_id).state
                    if state is None or not state.is_final():
                        continue
                    del pending[run_id]
                    if state.type != StateType.COMPLETED:
                        for other in pending:
                            client.set_flow_run_state(other, Cancelling(), force=True)
                        raise GptcoreError(f"{engine} failed on node {rank} of {config.train.nnodes}: "
                                           f"{state.message or state.name}", f"flow run {run_id}",
                                           "fix the cause and run again: it resumes from the newest checkpoint")
                time.sleep(poll)
    finally:
        follower.done.set()
        follower.join(timeout=10)
    summary_file = launch_dir_of(out_dir, config.train.model_copy(update={"node_rank": 0})) / "summary.json"
    summary = json.loads(summary_file.read_text())
    for cb in callbacks:
        cb("end", summary)
    return summary
