"""Our model behind EleutherAI's lm-evaluation-harness (`gptcore evaluate --tasks lm-eval:TASK`).

lm-eval asks a model three kinds of question. `LMEvalAdapter` answers each exactly as lm-eval's
own Hugging Face model (`HFLM`) does for the same weights, so a score here is a score there:

    loglikelihood(context, continuation)
        trailing whitespace moves from the context to the continuation ("Answer: " + "yes" is
        scored as "Answer:" + " yes"), then context + continuation is encoded *together* and the
        continuation is the tokens after the context's own encoding. An empty context is
        conditioned on <|endoftext|>. Too long: the left end is cut so it fits max_length + 1.
    loglikelihood_rolling(text)
        the document's log-likelihood in windows of max_length predicted tokens; the first window
        is conditioned on <|endoftext|>, every later one on as many preceding tokens as fit
        (`rolling_windows`, lm-eval's get_rolling_token_windows + make_disjoint_window).
    generate_until(context, {"until", "max_gen_toks", "do_sample", "temperature", ...})
        the context left-truncated to max_length - max_gen_toks tokens (max_gen_toks defaults to
        256), greedy unless do_sample (a temperature > 0 turns it on, as lm-eval), stopped at
        <|endoftext|> or the first `until` string, which is cut off.

Text is encoded with special tokens recognised ("<|endoftext|>" in a prompt is that token), as a
Hugging Face tokenizer does.
"""

from __future__ import annotations

import codecs
from typing import Any, Iterator, Sequence

import torch

from gptcore.errors import DataError
from gptcore.evaluation.scoring import continuation_logprobs

try:  # optional: the adapter works on plain request objects without it
    from lm_eval.api.model import LM as _LMBase  # type: ignore
except Exception:  # noqa: BLE001 - not installed
    _LMBase = object

MAX_GEN_TOKS = 256  # lm-eval's default for HFLM
HF_TOP_K = 50  # transformers' GenerationConfig default, what HFLM samples with unless a task says otherwise


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: the context's trailing whitespace belongs to the continuation.

        >>> move_trailing_space("Answer: ", "yes")
        ('Answer:', ' yes')
    """
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, predicted) windows covering `tokens`, each predicted token exactly once.

    The first window predicts tokens[:max_len] after `prefix`; each later one predicts the next
    max_len tokens (fewer at the end) after all the tokens before them that still fit, so the last,
    partial window gets max_len + 1 - len(predicted) tokens of context, not one.

        >>> list(rolling_windows([1, 2, 3, 4, 5], prefix=0, max_len=2))
        [([0], [1, 2]), ([2], [3, 4]), ([3, 4], [5])]
    """
    done = 0
    while done < len(tokens):
        n = min(max_len, len(tokens) - done)
        start = max(0, done + n - max_len - 1)  # context + predicted = max_len + 1 tokens
        yield (tokens[start:done] if done else [prefix]), tokens[done : done + n]
        done += n


class LMEvalAdapter(_LMBase):
    """Our model behind lm-evaluation-harness's LM interface (requests carry `.args`)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_gen_toks: int = MAX_GEN_TOKS):
        if _LMBase is not object:
            super().__init__()
        if tokenizer.eot_id is None:
            raise DataError("the tokenizer has no <|endoftext|> token", "lm-eval",
                            "lm-eval conditions empty contexts on it; train with special_tokens: ['<|endoftext|>']")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = model.config.block_size
        self.max_gen_toks = max_gen_toks
        self.eot = tokenizer.eot_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all")

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval forms them."""
        if context == "":
            cont = self._encode(continuation)
            return ([self.eot], cont) if not cont or cont[0] != self.eot else (cont[:1], cont[1:])
        context, continuation = move_trailing_space(context, continuation)
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return continuation_logprobs(self.model, [self._pair(*r.args[:2]) for r in requests], self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            windows = list(rolling_windows(self._encode(r.args[0]), self.eot, self.max_length))
            out.append(sum(lp for lp, _ in continuation_logprobs(self.model, windows, self.batch_size)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate(r.args[0], dict((r.args[1] if len(r.args) > 1 else None) or {})) for r in requests]

    def _generate(self, context: str, kw: dict[str, Any]) -> str:
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        n_new = int(next((kw[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kw.get(k) is not None),
                         self.max_gen_toks))
        room = self.max_length - n_new
        if room <= 0:
            raise DataError(f"max_gen_toks {n_new} leaves no room for a context in block_size {self.max_length}",
                            "lm-eval generate_until", "lm-eval's hf model refuses this too; use a model with a "
                            "longer context or a task with shorter generations")
        temperature = float(kw.get("temperature") or 0.0)
        do_sample = kw.get("do_sample")
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        if not do_sample or temperature == 0:
            temperature = 0.0
        ids = (self._encode(context) or [self.eot])[-room:]
        device = next(self.model.parameters()).device
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        top_k = kw.get("top_k", HF_TOP_K) if temperature else None
        stops = [s for s in until if s]
        special = set(self.tokenizer.special_tokens.values())
        text, decoder = "", codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tok in self.model.generate_stream(idx, n_new, temperature=temperature, top_k=top_k,
                                              top_p=kw.get("top_p"), eos_id=self.eot):
            t = int(tok[0, 0])
            if t == self.eot:
                break
            if t not in special:  # decoded with special tokens skipped, as HFLM's tok_decode
                text += decoder.decode(self.tokenizer.decode_bytes([t]))
            if any(s in text for s in stops):
                break
        text += decoder.decode(b"", final=True)
        for s in stops:  # cut at the first stop string
            text = text.split(s)[0]
        return text


def _task_names(tasks: Sequence[str]):
    """lm-eval's TaskManager, after checking every name (or YAML path) is a task it knows."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager  # type: ignore

    paths = sorted({str(Path(t).parent if Path(t).is_file() else t) for t in tasks if Path(t).exists()})
    # indexing lm-eval's own ~10k task files takes ~20 s: skip it when every task is a file of ours
    manager = TaskManager(include_path=paths or None, include_defaults=len(paths) < len(tasks))
    known = set(manager.all_tasks)
    names = []
    for t in tasks:
        name = t
        if Path(t).is_file():  # a task YAML: its `task:` name
            import yaml

            name = (yaml.safe_load(Path(t).read_text()) or {}).get("task", Path(t).stem)
        if name not in known:
            close = sorted(k for k in known if name.lower() in k.lower())[:5]
            raise DataError(f"unknown lm-eval task {name!r}", f"lm-eval:{t}",
                            f"pick one of `lm-eval ls tasks`{' (e.g. ' + ', '.join(close) + ')' if close else ''}, "
                            "or give a task YAML file")
        names.append(name)
    return manager, names


def run_lm_eval(model, tokenizer, tasks: Sequence[str], limit: int | None = None, batch_size: int = 16) -> dict[str, Any]:
    """lm-evaluation-harness tasks (names, or paths to task YAML files) on our model through
    `LMEvalAdapter` (needs `pip install lm-eval`). Returns {task: {metric: value}} with lm-eval's
    metric names ("acc,none", "acc_stderr,none", "word_perplexity,none", ...)."""
    if _LMBase is object:
        raise DataError("lm-evaluation-harness is not installed", "lm-eval:" + "+".join(tasks),
                        "pip install lm-eval, or use --tasks mc:PATH.jsonl / hellaswag")
    import lm_eval  # type: ignore

    manager, names = _task_names(tasks)
    out = lm_eval.simple_evaluate(model=LMEvalAdapter(model, tokenizer, batch_size), tasks=names, limit=limit,
                                  task_manager=manager)
    return {name: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for name, r in out["results"].items()}
