"""Project 4 — using the model you made (docs/04-gpt2.md, "Use the model").

    session.py     `Session`: a model folder loaded once, prompts built with its fine-tuning
                   template (finetune.json), replies streamed and cut at stop strings
    chat.py        `gptcore chat MODEL`: the terminal chat (/reset, /temp 0.7, Ctrl-D quits)
    openai_api.py  `gptcore serve MODEL`: OpenAI-compatible /v1/completions and
                   /v1/chat/completions (streaming included) on FastAPI + uvicorn

The Hugging Face and GGUF exports are in gptcore/convert/; the MLflow model (tasks/pyfunc_model.py)
wraps the same `Session`.
"""

from gptcore.serving.session import Reply, Session, read_prompt_template

__all__ = ["Reply", "Session", "read_prompt_template"]
