"""Our model behind EleutherAI's lm-evaluation-harness (`gptcore evaluate --tasks lm-eval:TASK`).

lm-eval asks a model three kinds of question; `LMEvalAdapter` answers each with our scoring
(`gptcore.evaluation.evaluate.continuation_logprobs`) and our KV-cache generation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from gptcore.errors import DataError
from gptcore.evaluation.scoring import continuation_logprobs


try:  # optional: the adapter works on plain request objects without it
    from lm_eval.api.model import LM as _LMBase  # type: ignore
except Exception:  # noqa: BLE001 - not installed
    _LMBase = object


class LMEvalAdapter(_LMBase):
    """Our model behind lm-evaluation-harness's LM interface. Requests carry `.args`:

        loglikelihood:          (context, continuation)   -> (sum log p, is_greedy)
        loglikelihood_rolling:  (text,)                    -> sum log p of the whole text
        generate_until:         (context, {"until": [...], "max_gen_toks": n})  -> greedy text
    """

    def __init__(self, model, tokenizer, batch_size: int = 16):
        if _LMBase is not object:
            super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for r in requests:
            context, continuation = r.args[0], r.args[1]
            ctx = self.tokenizer.encode_ordinary(context) if context else self._prefix()
            pairs.append((ctx, self.tokenizer.encode_ordinary(continuation)))
        return continuation_logprobs(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        bs = self.model.config.block_size
        out = []
        for r in requests:
            toks = self.tokenizer.encode_ordinary(r.args[0])
            prefix = self._prefix()
            if not prefix:  # no end-of-text token: the first token is context, not scored
                prefix, toks = toks[:1], toks[1:]
            pairs = []
            for i in range(0, len(toks), bs):  # disjoint windows, each conditioned on the token before it
                ctx = prefix if i == 0 else toks[i - 1 : i]
                pairs.append((ctx, toks[i : i + bs]))
            out.append(sum(lp for lp, _ in continuation_logprobs(self.model, pairs, self.batch_size)))
        return out

    def generate_until(self, requests) -> list[str]:
        device = next(self.model.parameters()).device
        out = []
        for r in requests:
            context, kw = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tokenizer.encode_ordinary(context) or self._prefix() or [0]
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            y = self.model.generate(idx, int(kw.get("max_gen_toks", 64)), temperature=0.0, eos_id=self.tokenizer.eot_id)
            text = self.tokenizer.decode([t for t in y[0, len(ids):].tolist() if t != self.tokenizer.eot_id])
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
        return out

    def _prefix(self) -> list[int]:
        return [self.tokenizer.eot_id] if self.tokenizer.eot_id is not None else []


def run_lm_eval(model, tokenizer, tasks: Sequence[str], limit: int | None = None) -> dict[str, Any]:
    """Any lm-evaluation-harness task on our model through `LMEvalAdapter` (needs `pip install lm-eval`)."""
    if _LMBase is object:
        raise DataError("lm-evaluation-harness is not installed", "lm-eval:" + "+".join(tasks),
                        "pip install lm-eval, or use --tasks mc:PATH.jsonl / hellaswag")
    import lm_eval  # type: ignore

    out = lm_eval.simple_evaluate(model=LMEvalAdapter(model, tokenizer), tasks=list(tasks), limit=limit)
    return {name: {k: v for k, v in r.items() if isinstance(v, (int, float))} for name, r in out["results"].items()}
