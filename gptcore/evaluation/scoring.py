"""Scoring a continuation: the one primitive multiple choice and lm-eval both build on.

    log p(continuation | context) = Σ_i log softmax(model(context + continuation[:i]))[continuation[i]]

computed in one forward pass per batch of (context, continuation) pairs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from gptcore.errors import DataError


def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum log p(continuation | context), greedy?).

    Sequences longer than the model's block are cut from the left. `greedy` is True when every
    continuation token is the argmax at its position (lm-eval's `is_greedy`).
    """
    device = next(model.parameters()).device
    bs = model.config.block_size
    out: list[tuple[float, bool]] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            rows, spans = [], []
            for ctx, cont in chunk:
                if not cont:
                    raise DataError("empty continuation", "loglikelihood request", "give at least one continuation token")
                full = (list(ctx) + list(cont))[-(bs + 1):]
                inp = full[:-1]
                rows.append(inp)
                spans.append((len(inp) - len(cont), full[-len(cont):]))  # first scored position, targets
            L = max(len(r) for r in rows)
            x = torch.zeros(len(rows), L, dtype=torch.long)
            for r, ids in enumerate(rows):
                x[r, : len(ids)] = torch.tensor(ids)
            with torch.no_grad():
                logits, _ = model(x.to(device))
            logp = F.log_softmax(logits.float(), dim=-1)  # (b, L, V)
            for r, (start, targets) in enumerate(spans):
                tgt = torch.tensor(targets, device=device)
                lp = logp[r, start : start + len(targets)]  # (n, V)
                out.append((float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
    finally:
        model.train(was_training)
    return out
