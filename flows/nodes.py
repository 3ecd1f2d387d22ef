"""One node of a multi-node training stage, as a Prefect flow a worker on each GPU machine runs.

    pretrain stage (nnodes = N)                      tasks/nodes.py: run_on_nodes
        run_deployment("gptcore-node/gpu-node", node_rank=0) ─┐   one flow run per node, picked up by
        ...                                                   ├─ the workers of the `gpu` pool (one
        run_deployment("gptcore-node/gpu-node", node_rank=N-1)┘   per machine); each runs torchrun
                                                                  with its node_rank (static
                                                                  rendezvous at train.rdzv_endpoint)

The stage waits for all of them and fails (cancelling the rest) as soon as one fails. Rank 0 (on
node 0) writes metrics, checkpoints and the summary into the stage's folder, which must therefore
be on storage every node sees (`tracking.result_store` on a shared filesystem).
"""

from __future__ import annotations

import tasks  # noqa: F401  (offline defaults first)
from prefect import flow

from gptcore.config import Config
from gptcore.training.launch import launch, nproc_of


@flow(name="gptcore-node")
def node(engine: str, config: dict, args: list[str], out_dir: str) -> dict:
    """Run `engine` ("pretrain" | "finetune") on this node's ranks; node 0 returns the summary."""
    cfg = Config.model_validate(config)
    return launch(engine, cfg, [*args, out_dir], out_dir, nproc_of(engine, cfg))
