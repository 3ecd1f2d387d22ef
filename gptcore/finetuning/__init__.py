"""Project 4 — fine-tuning for one's own use case (docs/05-finetuning.md).

    objectives.py  what fine-tuning optimises and reports: the instruction loss (response tokens
                   only), the classification head and loss, validation loss, accuracy, samples
    finetune.py    the recipe: a base model + LoRA (or every weight) + records, on the training engine
"""

from gptcore.reads import Reads

# what the recipe reads (gptcore/reads.py), declared here without torch so the pipeline can key a
# cached stage without importing the engine; finetune.py re-exports it as READS
READS = Reads(
    keys=("run.seed", "finetune", "train.grad_clip", "train.beta1", "train.beta2", "train.dtype", "train.device",
          "train.num_threads", "train.max_bad_steps", "train.keep_last", "train.progress", "eval.sample_tokens",
          "eval.repetition_penalty", "eval.no_repeat_ngram_size",
          "train.nproc_per_node", "train.nnodes", "train.node_rank", "train.rdzv_endpoint", "train.node_deployment", "train.fsdp"),
    cadence=("finetune.log_every", "finetune.eval_every", "finetune.ckpt_every", "train.keep_last", "train.progress",
             "train.max_bad_steps", "train.node_rank", "train.rdzv_endpoint", "train.node_deployment"),
    extend=("finetune.max_steps",),
    report=("finetune.eval_batches", "finetune.num_samples", "eval.sample_tokens", "eval.repetition_penalty",
            "eval.no_repeat_ngram_size"),
    files=("finetune.dataset",),
)
