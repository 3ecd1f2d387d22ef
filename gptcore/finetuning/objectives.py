"""What fine-tuning optimises and how it reports: one loss per task, evaluation, samples.

    instruct   loss = mean cross-entropy on the response tokens only (prompt and padding are -100)
    classify   logits = head(h[last real token]) ∈ R^classes; loss = cross-entropy with the label
    report     validation loss; accuracy + confusion table beside the majority-class baseline;
               greedy answers to held-out instructions beside their references

`Trainee` bundles the model and (for classification) its new head into one module, so the
optimizer, the checkpoint and the training engine see a single set of trainable parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcore.data import sft as sft_data


class Trainee(nn.Module):
    """The model being fine-tuned plus, for classification, its new head: one module for the optimizer."""

    def __init__(self, model: nn.Module, head: nn.Linear | None, task: str = "instruct", pad_id: int = 0):
        super().__init__()
        self.model, self.head, self.task, self.pad_id = model, head, task, pad_id

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def forward(self, batch: list, counted: bool = False):
        """The task's loss on a batch of encoded examples — with `counted`, (loss, tokens or examples
        it averages over). A forward through this module, so a DDP or FSDP2 wrapper sees the call
        (DDP synchronises the gradients; FSDP2 gathers the weights)."""
        device = next(self.parameters()).device
        if self.task == "instruct":
            loss, n = instruct_loss(self.model, batch, self.pad_id, device)
        else:
            loss, n = classify_loss(self.model, self.head, batch, self.pad_id, device)
        return (loss, n) if counted else loss


# --------------------------------------------------------------------------------------------
# losses and evaluation


def instruct_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, int]:
    x, y = sft_data.pad_batch(batch, pad_id)  # (B, L), (B, L) with -100 on prompt + padding
    x, y = x.to(device), y.to(device)
    _, loss = model(x, y)
    return loss, int((y != sft_data.IGNORE_INDEX).sum())


def classify_logits(model, head, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    h = model.hidden(x)  # (B, L, C)
    h_last = h[torch.arange(x.size(0), device=x.device), last]  # (B, C): each text's last real token
    return head(h_last.to(head.weight.dtype))  # (B, classes)


def classify_loss(model, head, batch, pad_id: int, device) -> tuple[torch.Tensor, int]:
    ids, labels = zip(*batch)
    x, last, y = sft_data.pad_classify(list(ids), list(labels), pad_id)
    logits = classify_logits(model, head, x.to(device), last.to(device))
    return F.cross_entropy(logits.float(), y.to(device)), int(y.numel())


@torch.no_grad()
def eval_loss(trainee: nn.Module, examples: list, task: str, batch_size: int, max_batches: int, pad_id: int, device, amp) -> float:
    """Mean loss over (up to) the first max_batches batches of a split, weighted by counted tokens/examples.

    `trainee` is the Trainee or the DDP/FSDP2 module around it: the loss comes from its forward."""
    was = trainee.training
    trainee.eval()
    total, count = 0.0, 0
    for i in range(0, min(len(examples), batch_size * max_batches), batch_size):
        batch = examples[i: i + batch_size]
        with amp():
            loss, n = trainee(batch, counted=True)
        total, count = total + float(loss) * n, count + n
    trainee.train(was)
    return total / max(1, count)


@torch.no_grad()
def classify_report(trainee: Trainee, examples: list, labels: list[str], train_labels: list[int], pad_id: int, device, amp,
                    batch_size: int = 32) -> dict:
    """Accuracy, the confusion table (rows: true label, columns: predicted) and the majority-class baseline."""
    trainee.eval()
    K = len(labels)
    confusion = [[0] * K for _ in range(K)]
    for i in range(0, len(examples), batch_size):
        ids, ys = zip(*examples[i: i + batch_size])
        x, last, y = sft_data.pad_classify(list(ids), list(ys), pad_id)
        with amp():
            pred = classify_logits(trainee.model, trainee.head, x.to(device), last.to(device)).argmax(-1).cpu()
        for t, p in zip(y.tolist(), pred.tolist()):
            confusion[t][p] += 1
    n = max(1, len(examples))
    majority = max(range(K), key=lambda k: (train_labels.count(k), -k))  # the most frequent training label
    return {
        "accuracy": sum(confusion[k][k] for k in range(K)) / n,
        "majority_label": labels[majority],
        "majority_baseline": sum(1 for _, y in examples if y == majority) / n,
        "confusion": confusion,
        "labels": labels,
        "examples": len(examples),
    }


def format_confusion(report: dict) -> str:
    """A plain-text confusion table: rows are true labels, columns predicted (label ids as column heads)."""
    labels, conf = report["labels"], report["confusion"]
    w = max(len(x) for x in labels)
    lines = [" " * (w + 2) + " ".join(f"{j:>5d}" for j in range(len(labels)))]  # header: predicted ids
    for i, row in enumerate(conf):
        lines.append(f"{labels[i]:>{w}} {i:>1d}" + " ".join(f"{c:>5d}" for c in row))
    lines.append(f"accuracy {report['accuracy']:.3f}  majority-class baseline ({report['majority_label']}) "
                 f"{report['majority_baseline']:.3f}  on {report['examples']} examples")
    return "\n".join(lines)


@torch.no_grad()
def instruct_samples(model, encoder: sft_data.Encoder, records: list[dict], max_new_tokens: int, device, amp,
                     temperature: float = 0.0, seed: int = 0, **penalties) -> list[dict]:
    """Greedy (temperature 0) answers for held-out instructions, beside the reference answers.
    `penalties`: repetition_penalty, no_repeat_ngram_size (the eval section's, in the recipe)."""
    model.eval()
    out = []
    g = torch.Generator(device=device).manual_seed(seed) if device.type != "mps" else None
    for r in records:
        ids = encoder.prompt_ids(r, room=max_new_tokens)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        with amp():
            seq = model.generate(idx, max_new_tokens, temperature=temperature, eos_id=encoder.eot, generator=g, **penalties)
        new = seq[0, len(ids):].tolist()
        if encoder.eot in new:
            new = new[: new.index(encoder.eot)]
        out.append({"instruction": r["instruction"], "input": r.get("input", ""), "reference": r["output"],
                    "generated": encoder.tok.decode(new).strip()})
    return out


def format_samples(samples: list[dict], title: str) -> str:
    parts = [f"# {title}\n"]
    for i, s in enumerate(samples, 1):
        parts.append(f"=== sample {i} ===\n### Instruction:\n{s['instruction']}\n")
        if s["input"]:
            parts.append(f"### Input:\n{s['input']}\n")
        parts.append(f"### Reference:\n{s['reference']}\n\n### Generated:\n{s['generated']}\n")
    return "\n".join(parts)
