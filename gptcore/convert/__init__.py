"""Project 4 — GPT-2's weights in and out (docs/04-gpt2.md).

    hf.py  Hugging Face GPT-2 folders <-> our model folders: OpenAI's Conv1D weights transposed,
           the tokenizer as vocab.json + merges.txt
"""

from gptcore.convert.hf import (checkpoint_from_hf, checkpoint_to_hf, check_gpt2_compatible, config_from_hf,
                                gpt2_vocab_and_merges, load_hf_gpt2, save_hf_gpt2)
from gptcore.tokenizer.formats import bytes_to_unicode, unicode_to_bytes

__all__ = ["bytes_to_unicode", "check_gpt2_compatible", "checkpoint_from_hf", "checkpoint_to_hf", "config_from_hf",
           "gpt2_vocab_and_merges", "load_hf_gpt2", "save_hf_gpt2", "unicode_to_bytes"]
