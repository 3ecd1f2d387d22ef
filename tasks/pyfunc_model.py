"""The MLflow model of a gptcore model folder: an `mlflow.pyfunc` PythonModel over `gptcore.serving.Session`.

    m = mlflow.pyfunc.load_model("models:/gptcore-finetuned@champion")
    m.predict(["def add(a, b):"], params={"max_new_tokens": 32, "temperature": 0.0})   # -> ["..."]
    mlflow models serve -m models:/gptcore-finetuned@champion --env-manager local     # POST /invocations

This file is logged as MLflow "model from code" (`tasks/tracking.log_pyfunc_model`): MLflow stores it
beside the model folder (artifact "model") and the gptcore package (code path), and runs it on load.
A fine-tuned folder's finetune.json names its prompt template, so each prompt is wrapped the way
fine-tuning trained it; a pre-trained model continues the text as given.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 200}


def _prompts(model_input) -> list[str]:
    """Prompts from what pyfunc hands over: a list of strings, a Series, or a DataFrame (column "prompt")."""
    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[col].tolist()]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return [model_input] if isinstance(model_input, str) else [str(x) for x in model_input]


class GptcoreModel(PythonModel):
    """Prompts in, generated text out; params: max_new_tokens, temperature (0 = greedy), top_k."""

    def load_context(self, context):
        from gptcore.serving.session import Session

        self.session = Session(context.artifacts["model"])

    # model_input: pd.DataFrame is what pyfunc hands over under our signature (one string column). MLflow
    # infers no schema from that hint (ours, with params, is explicit) and so validates nothing more,
    # as without a hint, but it no longer prints its "add type hints" advice at every load.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        p = {**DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        top_k = int(p["top_k"]) if p["top_k"] and int(p["top_k"]) > 0 else None
        return [self.session.complete(prompt, int(p["max_new_tokens"]), float(p["temperature"]), top_k)
                for prompt in _prompts(model_input)]


mlflow.models.set_model(GptcoreModel())
