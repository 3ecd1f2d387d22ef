"""gptcore — GPT-2 from scratch, as the course's four projects (docs/README map: README.md).

    foundation   errors.py  fileio.py  progress.py  metrics.py  config.py  cpus.py  (formats and plumbing)
    Project 1    tokenizer/     byte-level BPE: reference and fast trainers, tiktoken parity  docs/01-tokenizer.md
    Project 2    model/         attention, blocks, GPT, LoRA, generation, model folders       docs/02-attention.md
    Project 3    data/          corpora -> verified token shards                               docs/03-data.md
                 training/      one engine (train_step + loop), optimizer, checkpoints,
                                distributed, memory plan, pre-training                         docs/03-pretraining.md
                 evaluation/    bits per byte, multiple choice, samples, lm-eval               docs/03-pretraining.md
    Project 4    convert/       GPT-2 weights in and out (Hugging Face)                        docs/04-gpt2.md
                 finetuning/    instruction tuning and classification on the same engine       docs/05-finetuning.md
    on top       cli.py         the `gptcore` verbs (the only module that may reach flows/)

Imports run one way: foundation <- tokenizer, model <- data <- training, evaluation <- finetuning,
convert <- cli. docs/architecture.md draws it. The flat module names of earlier releases
(`gptcore.train`, `gptcore.lora`, `gptcore.checkpoint`, ...) still import: they are aliases of the
modules that now hold their code (`MOVED` below).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old flat module -> the module that holds its code now
MOVED = {
    "gptcore.bpe_train": "gptcore.tokenizer.train",
    "gptcore.tokenizer_base": "gptcore.tokenizer.base",
    "gptcore.tokenizer_sp": "gptcore.tokenizer.sp",
    "gptcore.lora": "gptcore.model.lora",
    "gptcore.generate": "gptcore.model.generate",
    "gptcore.checkpoint": "gptcore.model.folder",
    "gptcore.sources": "gptcore.data.sources",
    "gptcore.shards": "gptcore.data.shards",
    "gptcore.sft_data": "gptcore.data.sft",
    "gptcore.train": "gptcore.training.pretrain",
    "gptcore.optim": "gptcore.training.optim",
    "gptcore.checkpointing": "gptcore.training.checkpoints",
    "gptcore.distributed": "gptcore.training.distributed",
    "gptcore.plan": "gptcore.training.plan",
    "gptcore.evaluate": "gptcore.evaluation.evaluate",
    "gptcore.finetune": "gptcore.finetuning.finetune",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import an old module name as the module that replaced it (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


from gptcore.cpus import quiet_openmp  # noqa: E402

quiet_openmp()  # before anything imports torch: OpenMP threads sleep, not spin, while they wait (gptcore/cpus.py)

if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.append(_Alias())
