"""Project 4 — GPT-2's weights in and out (docs/04-gpt2.md).

    hf.py            Hugging Face GPT-2 folders <-> our model folders: OpenAI's Conv1D weights transposed
    hf_tokenizer.py  our BPE as a `tokenizers` tokenizer.json (any split pattern, Oniguruma-safe) and back
    gguf_export.py   our model folders -> GGUF for llama.cpp / Ollama (gpt2 architecture, llama-bpe split)
"""

from gptcore.convert.hf import (checkpoint_from_hf, checkpoint_to_hf, check_gpt2_compatible, config_from_hf,
                                gpt2_vocab_and_merges, load_hf_gpt2, save_hf_gpt2)
from gptcore.tokenizer.formats import bytes_to_unicode, unicode_to_bytes

__all__ = ["bytes_to_unicode", "check_gpt2_compatible", "checkpoint_from_hf", "checkpoint_to_hf", "config_from_hf",
           "gpt2_vocab_and_merges", "load_hf_gpt2", "save_hf_gpt2", "unicode_to_bytes"]
