"""How good is the model, honestly: held-out loss in units that compare across tokenizers, beside
the baselines it has to beat, plus samples and multiple-choice accuracy.

    val loss   mean cross-entropy (nats/token) over the validation split's windows
    perplexity exp(val loss)
    bits/byte  val loss / ln 2 × tokens/bytes of the val split (from manifest.json). A tokenizer
               with bigger tokens has a higher loss per token but the same bits per byte for the
               same model quality, so bpb is what we compare.
    unigram    the same bits/byte for a model that ignores context: token frequencies of the
               training shards with add-one smoothing, p(t) = (count(t) + 1) / (N + V)
    previous   the bits/byte the previous best model got (its eval.json), when given
    parse rate the fraction of sampled continuations (every eval prompt × seed, `eval.sample_tokens`
               tokens each) that are valid Python: prompt + continuation, cut after its last complete
               line, dedented, accepted by `compile(..., "exec")`. The builtin corpus is Python, so
               this is a quality signal a learner can read: bpb says how well the model predicts,
               parse rate whether what it writes is code.

Multiple choice (HellaSwag style): each ending is scored by the log-likelihood of its tokens given
the context; `acc` picks the highest sum, `acc_norm` the highest sum per byte of the ending.
`gptcore.evaluation.lm_eval` exposes the same scoring to EleutherAI's lm-evaluation-harness.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from gptcore.errors import DataError
from gptcore.evaluation.scoring import continuation_logprobs

LN2 = math.log(2)

# what `evaluate_checkpoint` reads from a config (gptcore/reads.py)
from gptcore.evaluation import READS  # noqa: E402,F401  (declared in the package, torch-free: a cached pipeline run never imports torch)


# ---------------------------------------------------------------------------------------------
# the data side: manifest and token streams


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The complete, verified manifest.json of a data folder (`gptcore.data.sharding.load_manifest`)."""
    from gptcore.data.sharding import load_manifest

    return load_manifest(data_dir)


def _split_info(manifest: dict, split: str) -> dict[str, Any]:
    info = manifest.get("splits", {}).get(split)
    if not isinstance(info, dict):
        raise DataError(f"manifest.json has no '{split}' split", "manifest.json", "run `gptcore prepare` again")
    return info


def split_stats(data_dir: str | Path, split: str = "val") -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of a split, as `gptcore prepare` counted them."""
    info = _split_info(read_manifest(data_dir), split)
    return int(info["tokens"]), int(info["bytes"])


def _shards(data_dir: str | Path, split: str) -> Iterable[np.ndarray]:
    from gptcore.data.sharding import open_shard

    for shard in _split_info(read_manifest(data_dir), split).get("shards", []):
        yield open_shard(data_dir, shard)


def unigram_bpb(data_dir: str | Path, chunk: int = 1 << 26) -> float:
    """Bits per byte on the val split of a context-free model of the training shards (add-one smoothed).

    Counts stream through the memmapped shards in chunks, so 10B training tokens need no more memory
    than one chunk.
    """
    counts = np.zeros(int(read_manifest(data_dir).get("vocab_size") or 1), dtype=np.int64)  # (V,)
    for tokens in _shards(data_dir, "train"):
        for i in range(0, len(tokens), chunk):
            c = np.bincount(tokens[i:i + chunk], minlength=len(counts))
            counts = np.pad(counts, (0, len(c) - len(counts))) + c
    val = np.concatenate(list(_shards(data_dir, "val")))
    counts = np.pad(counts, (0, max(0, int(val.max()) + 1 - len(counts))))
    V = len(counts)
    logp = np.log((counts + 1.0) / (counts.sum() + V))  # (V,) nats per token, add-one smoothed
    nats, n = -float(logp[val].sum()), len(val)
    tokens_val, nbytes = split_stats(data_dir, "val")
    return float(nats / n / LN2 * tokens_val / nbytes)


# ---------------------------------------------------------------------------------------------
# validation loss


@torch.no_grad()
def val_metrics(
    model: torch.nn.Module,
    data_dir: str | Path,
    batch_size: int = 8,
    block_size: int | None = None,
    batches: int = 20,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Loss/perplexity/bpb on consecutive non-overlapping windows from the start of the val split.

    Always the same windows (the first `batches × batch_size`: `iter_eval_batches`, read from the
    memmapped shards, not a copy of the split), so numbers compare across steps.
    """
    from gptcore.data.sharding import iter_eval_batches

    device = torch.device(device) if device is not None else next(model.parameters()).device
    tok, nbytes = split_stats(data_dir, "val")
    T = min(block_size or model.config.block_size, tok - 1)  # a tiny val split still gives one window
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in iter_eval_batches(data_dir, batch_size, T, max_batches=batches, vocab_size=model.config.vocab_size):
            x, y = x.to(device), y.to(device)  # (b, T) each
            amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with amp:
                _, loss = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_bpb": loss / LN2 * tok / nbytes, "val_tokens": count}


# ---------------------------------------------------------------------------------------------
# scoring continuations (multiple choice and lm-eval)


@torch.no_grad()
def load_mc_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Items {context: str, endings: [str, ...], label: int} from a JSONL file, each line checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError("multiple-choice file not found", str(path), "pass a JSONL of {context, endings, label}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ok = (isinstance(d, dict) and isinstance(d.get("context"), str) and isinstance(d.get("endings"), list)
                  and len(d["endings"]) >= 2 and all(isinstance(e, str) and e for e in d["endings"])
                  and isinstance(d.get("label"), int) and 0 <= d["label"] < len(d["endings"]))
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise DataError(f"line {n} is not {{context: str, endings: [str, str, ...], label: int index}}", str(path),
                            "fix that line")
        items.append(d)
    if not items:
        raise DataError("multiple-choice file has no items", str(path), "add JSONL lines of {context, endings, label}")
    return items


def hellaswag_items(split: str = "validation", limit: int | None = None) -> list[dict[str, Any]]:
    """HellaSwag through `datasets` (needs the Hub): items in our {context, endings, label} form."""
    try:
        from datasets import load_dataset

        ds = load_dataset("Rowan/hellaswag", split=split)
    except Exception as exc:  # offline, or the Hub refused
        raise DataError(f"cannot load HellaSwag ({exc.__class__.__name__})", "hf:Rowan/hellaswag",
                        "go online, or pass a local file with --tasks mc:PATH.jsonl") from None
    items = []
    for row in ds:
        if limit is not None and len(items) >= limit:
            break
        items.append({"context": row["ctx"], "endings": list(row["endings"]), "label": int(row["label"])})
    return items


def multiple_choice(model, tokenizer, items: Iterable[dict[str, Any]]) -> dict[str, float]:
    """acc (highest log-likelihood) and acc_norm (highest log-likelihood per byte of the ending)."""
    items = list(items)
    pairs, owners = [], []
    for k, it in enumerate(items):
        ctx = tokenizer.encode_ordinary(it["context"])
        for e in it["endings"]:
            # the space between context and ending belongs to the ending, as in GPT-2's tokenization
            ending = e if e[:1].isspace() or not it["context"] or it["context"][-1:].isspace() else " " + e
            pairs.append((ctx, tokenizer.encode_ordinary(ending)))
            owners.append((k, len(ending.encode("utf-8"))))
    scores = continuation_logprobs(model, pairs)
    best = {}
    for (k, nbytes), (lp, _) in zip(owners, scores):
        best.setdefault(k, []).append((lp, lp / nbytes))
    acc = sum(int(np.argmax([s for s, _ in best[k]]) == it["label"]) for k, it in enumerate(items)) / len(items)
    acc_norm = sum(int(np.argmax([s for _, s in best[k]]) == it["label"]) for k, it in enumerate(items)) / len(items)
    return {"acc": acc, "acc_norm": acc_norm, "n": len(items)}


# ---------------------------------------------------------------------------------------------
# samples


def samples(model, tokenizer, prompts: Sequence[str], seeds: Sequence[int], max_new_tokens: int = 64,
            temperature: float = 0.8, top_k: int | None = 50, **penalties) -> list[dict[str, Any]]:
    """One generation per (prompt, seed), each from its own seeded generator: reproducible.
    `penalties`: repetition_penalty, no_repeat_ngram_size (GPT.generate_stream; off unless given)."""
    device = next(model.parameters()).device
    return [{"prompt": prompt, "seed": seed,
             "text": _continue(model, tokenizer, prompt, max_new_tokens, temperature, top_k,
                               torch.Generator(device=device).manual_seed(seed), penalties)}
            for prompt in prompts for seed in seeds]


def greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, **penalties) -> list[dict[str, Any]]:
    """The most likely continuation of each prompt (temperature 0): what the model "believes" comes next."""
    return [{"prompt": p, "text": _continue(model, tokenizer, p, max_new_tokens, 0.0, None, None, penalties)} for p in prompts]


def _continue(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
              generator, penalties: dict) -> str:
    """The decoded continuation of `prompt` as the start of a document: after <|endoftext|>, as every
    training document begins (gptcore.data.sharding), so "def" reads as a file's first word."""
    eot = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    ids = (eot + tokenizer.encode_ordinary(prompt)) or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    y = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=tokenizer.eot_id,
                       generator=generator, **penalties)
    return tokenizer.decode(y[0, len(ids):].tolist())


def format_samples(result: dict[str, Any]) -> str:
    """samples.txt: per prompt, the greedy continuation, then each seed's sampled one, under the
    settings that made them."""
    settings = result.get("sampling", {})
    out = ["# " + ", ".join(f"{k} {v}" for k, v in settings.items()) + "\n"] if settings else []
    greedy_ = {g["prompt"]: g["text"] for g in result["tasks"].get("greedy", [])}
    sampled = result["tasks"].get("samples", [])
    for prompt in dict.fromkeys([*greedy_, *(s["prompt"] for s in sampled)]):
        out.append(f"=== prompt {prompt!r}\n")
        if prompt in greedy_:
            out.append(f"--- greedy\n{prompt}{greedy_[prompt]}\n")
        out += [f"--- sampled, seed {s['seed']}\n{prompt}{s['text']}\n" for s in sampled if s["prompt"] == prompt]
        out.append("\n")
    return "\n".join(out)


def complete_lines(text: str) -> str:
    """`text` up to and including its last newline: a sample cut mid-line loses the partial line.

        complete_lines("x = 1\ny = (") == "x = 1\n";   complete_lines("def f(") == ""
    """
    return text[: text.rfind("\n") + 1]


def parses(code: str) -> bool:
    """Whether `code` (after `textwrap.dedent`) compiles as a Python module; empty code does not count."""
    code = textwrap.dedent(code)
    if not code.strip():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for "\d" in a sampled string
            compile(code, "<sample>", "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def parse_rate(samples_: Sequence[dict[str, Any]]) -> dict[str, float]:
    """{"parse_rate": fraction of samples whose prompt + text, cut at the last complete line, parse; "n"}."""
    ok = [parses(complete_lines(s["prompt"] + s["text"])) for s in samples_]
    return {"parse_rate": sum(ok) / len(ok) if ok else float("nan"), "n": len(ok)}


# ---------------------------------------------------------------------------------------------
# the evaluate verb


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    data_dir: str | Path,
    config=None,
    tasks: Sequence[str] = ("val",),
    out_file: str | Path | None = None,
    previous: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a model folder (final/ or a checkpoint) on `tasks`; write `out_file` (eval.json).

    tasks: "val" (loss, ppl, bpb + unigram baseline), "samples", "mc:PATH.jsonl", "hellaswag",
    "lm-eval:TASK[+TASK...]" (lm-evaluation-harness, when installed).
    `previous`: an eval.json (or a folder holding one) of the previous best model, shown beside ours.
    """
    from gptcore.model.folder import load_model, model_sha256
    from gptcore.config import Config
    from gptcore.fileio import atomic_write_json

    config = config or Config()
    ev = config.eval
    for task in tasks:  # before loading anything
        if task not in ("val", "samples", "hellaswag") and not task.startswith(("mc:", "lm-eval:")):
            raise DataError(f"unknown evaluation task '{task}'", "--tasks",
                            "use val, samples, mc:PATH.jsonl, hellaswag or lm-eval:TASK[,TASK...]")
    model, tokenizer = load_model(checkpoint_dir)
    result: dict[str, Any] = {"checkpoint": str(checkpoint_dir), "model_sha256": model_sha256(checkpoint_dir),
                              "params": model.num_params(), "tasks": {}}
    for task in tasks:
        if task == "val":
            man = read_manifest(data_dir)
            if man.get("tokenizer_sha256") and man["tokenizer_sha256"] != tokenizer.sha256:
                raise DataError("the data was tokenized with a different tokenizer than the model's", str(data_dir),
                                "evaluate on the data folder the model was trained on")
            vm = val_metrics(model, data_dir, batch_size=8, batches=ev.batches)
            vm["unigram_bpb"] = unigram_bpb(data_dir)
            result["tasks"]["val"] = vm
        elif task == "samples":
            penalties = {"repetition_penalty": ev.repetition_penalty, "no_repeat_ngram_size": ev.no_repeat_ngram_size}
            result["sampling"] = {"temperature": ev.temperature, "top_k": ev.top_k, **penalties, "tokens": ev.sample_tokens}
            result["tasks"]["greedy"] = greedy(model, tokenizer, ev.prompts, ev.sample_tokens, **penalties)
            result["tasks"]["samples"] = samples(model, tokenizer, ev.prompts, ev.seeds, ev.sample_tokens, ev.temperature,
                                                 ev.top_k, **penalties)
            result["tasks"]["code"] = parse_rate(result["tasks"]["samples"])
        elif task.startswith("mc:"):
            result["tasks"][task] = multiple_choice(model, tokenizer, load_mc_jsonl(task[3:]))
        elif task == "hellaswag":
            result["tasks"]["hellaswag"] = multiple_choice(model, tokenizer, hellaswag_items())
        elif task.startswith("lm-eval:"):
            from gptcore.evaluation.lm_eval import run_lm_eval

            result["tasks"][task] = run_lm_eval(model, tokenizer, task.split(":", 1)[1].split("+"))
    if previous is not None:
        p = Path(previous)
        p = p / "eval.json" if p.is_dir() else p
        try:
            result["previous"] = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise DataError("cannot read the previous best model's eval.json", str(p), "pass an eval.json written by `gptcore evaluate`") from None
    if out_file is not None:
        atomic_write_json(out_file, result)
    return result


def format_report(result: dict[str, Any]) -> str:
    """A small text table: our numbers beside the unigram and previous-best baselines."""
    lines = [f"model   {result['checkpoint']}  ({result['params'] / 1e6:.2f} M params)"]
    val = result["tasks"].get("val")
    prev = (result.get("previous") or {}).get("tasks", {}).get("val", {})
    if val:
        lines += [
            f"{'':<16}{'this model':>12}{'unigram':>12}{'previous':>12}",
            f"{'val loss':<16}{val['val_loss']:>12.4f}{'':>12}{_fmt(prev.get('val_loss')):>12}",
            f"{'perplexity':<16}{val['val_ppl']:>12.2f}{'':>12}{_fmt(prev.get('val_ppl'), 2):>12}",
            f"{'bits per byte':<16}{val['val_bpb']:>12.4f}{val['unigram_bpb']:>12.4f}{_fmt(prev.get('val_bpb')):>12}",
        ]
    code = result["tasks"].get("code")
    if code:
        lines.append(f"{'parse rate':<16}{code['parse_rate']:>12.3f}   of {code['n']} samples that compile as Python")
    for name, r in result["tasks"].items():
        if name.startswith("mc:") or name == "hellaswag":
            lines.append(f"{name:<16}acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}  (n={r['n']})")
        elif name.startswith("lm-eval:"):
            lines += _lm_eval_lines(r)
    sampled = result["tasks"].get("samples", [])
    for g in result["tasks"].get("greedy", []):  # each prompt: greedy, then its sampled ones, side by side
        lines.append(f"{'greedy':<16}{g['prompt']!r}: {(g['prompt'] + g['text'])[:200]!r}")
        lines += [f"{'sampled seed=' + str(s['seed']):<16}{s['prompt']!r}: {(s['prompt'] + s['text'])[:200]!r}"
                  for s in sampled if s["prompt"] == g["prompt"]]
    if not result["tasks"].get("greedy"):
        lines += [f"sample seed={s['seed']} {s['prompt']!r}: {(s['prompt'] + s['text'])[:200]!r}" for s in sampled]
    return "\n".join(lines)


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _lm_eval_lines(results: dict[str, dict]) -> list[str]:
    """One line per lm-eval task: each metric ("acc,none" -> acc) with its standard error."""
    lines = []
    for task, metrics in results.items():
        parts = []
        for key, v in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(v, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            label = metric if filt in ("", "none") else f"{metric}[{filt}]"
            parts.append(f"{label} {v:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else ""))
        lines.append(f"lm-eval {task}  " + "  ".join(parts))
    return lines
