"""Project 3, part two — the training engine and pre-training (docs/03-pretraining.md).

    engine.py        one optimizer step (`train_step`) and one loop (schedule, accumulation, clipping,
                     the NaN policy, log/eval/checkpoint cadence, callbacks) for every recipe
    optim.py         AdamW groups and the learning-rate schedules (cosine, warmup-stable-decay)
    checkpoints.py   atomic, sha256-verified checkpoints; resume; pruning
    distributed.py   DDP and FSDP2 on torch.distributed (started by torchrun)
    devices.py       device and autocast choices
    plan.py          memory and time arithmetic before a GPU-hour is spent
    pretrain.py      the pre-training recipe: shards in, a model folder out
"""

from gptcore.reads import Reads

# what the recipe reads (gptcore/reads.py), declared here without torch so the pipeline can key a
# cached stage without importing the engine; pretrain.py re-exports it as READS
READS = Reads(
    keys=("run.seed", "model", "train"),
    cadence=("train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last", "train.progress",
             "train.max_bad_steps", "train.node_rank", "train.rdzv_endpoint", "train.node_deployment"),
    extend=("train.max_steps",),
    report=("train.eval_batches",),
)
