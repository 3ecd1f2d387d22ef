"""Project 4 — fine-tuning for one's own use case (docs/05-finetuning.md).

    objectives.py  what fine-tuning optimises and reports: the instruction loss (response tokens
                   only), the classification head and loss, validation loss, accuracy, samples
    finetune.py    the recipe: a base model + LoRA (or every weight) + records, on the training engine
"""
