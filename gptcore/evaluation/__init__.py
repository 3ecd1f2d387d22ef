"""Project 3, part three — evaluation (docs/03-pretraining.md).

    evaluate.py  validation loss and bits per byte beside the unigram baseline, multiple choice,
                 sample generations, and the report `gptcore evaluate` prints
    scoring.py   log p(continuation | context), batched: the primitive both build on
    lm_eval.py   an adapter so EleutherAI's lm-evaluation-harness can score our models
"""

from gptcore.reads import Reads

# what the recipe reads (gptcore/reads.py), declared here without torch so the pipeline can key a
# cached stage without importing the engine; evaluate.py re-exports it as READS
READS = Reads(keys=("eval",))
