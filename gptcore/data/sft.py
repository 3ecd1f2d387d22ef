"""Fine-tuning data: datasets as records, the prompt template, token masks and padded batches.

Two tasks, two record shapes:

    instruct   {"instruction": str, "input": str (may be ""), "output": str}     (Alpaca; book ch. 7)
    classify   {"text": str, "label": str | int}                                  (book ch. 6)

Sources (`finetune.dataset`):

    python-docstrings   builtin, offline: each documented function in Python's own standard library,
                        its signature + body (docstring removed) → the docstring's first paragraph.
    python-packages     builtin, offline, classify: a function's source → which of ten standard-library
                        packages it comes from (asyncio, email, http, ...).
    PATH.jsonl          one JSON object per line          PATH.json   a list of objects, or
                        {"train": [...], "validation": [...], "test": [...]}
    hf:NAME[:CONFIG][@SPLIT]   a Hugging Face dataset through `datasets`.

Records without a given split are split train/val/test 90/5/5 by a hash of their content, so the
split never depends on file order or on the machine, and validation is never empty.

The prompt template (Alpaca's, as in Raschka's book), with the `### Input:` block left out when the
input is empty:

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}<|endoftext|>

Only the response and the end-of-text token are trained on: every prompt position gets label -100,
which the model's cross-entropy ignores, and so does padding. Batches are padded on the right to
the longest example in the batch; with causal attention a real token never sees the padding after
it. We do not pack several examples into one row: our model has no per-document attention mask, so
packed examples would attend across each other.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import sysconfig
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from gptcore.errors import DataError

IGNORE_INDEX = -100
PROMPT_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
DOCSTRING_INSTRUCTION = "Write the first paragraph of the docstring for this Python function."
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "tkinter", "unittest", "urllib", "xml")
BUILTIN = ("python-docstrings", "python-packages")


@dataclass
class SFTData:
    """A fine-tuning dataset: records per split, its task, and (classify) the label names in id order."""

    task: str  # "instruct" | "classify"
    train: list[dict]
    val: list[dict]
    test: list[dict]
    labels: list[str] = field(default_factory=list)
    source: str = ""


# --------------------------------------------------------------------------------------------
# the builtin datasets, from the standard library's own source


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _functions(path: Path) -> Iterable[tuple[str, ast.AST, list[str]]]:
    """(qualname, node, source lines) for every function in a file, in source order."""
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    lines = src.splitlines()

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child, lines
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")

    yield from walk(tree, "")


def _source_without_docstring(node, lines: list[str]) -> str:
    """The function's own text (signature + body, decorators dropped), minus its docstring lines."""
    doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant) else None
    keep = [
        lines[i] for i in range(node.lineno - 1, node.end_lineno)
        if doc is None or not (doc.lineno - 1 <= i < doc.end_lineno)
    ]
    return textwrap.dedent("\n".join(keep)).strip("\n")


def first_paragraph(docstring: str) -> str:
    """'Return x.\\n\\n    More text.' → 'Return x.' (lines of the first paragraph joined by spaces)."""
    para = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    return " ".join(line.strip() for line in para.splitlines()).strip()


@functools.lru_cache(maxsize=1)
def python_docstrings() -> tuple[dict, ...]:
    """Instruction records from the top-level standard-library modules, in a fixed order.

    Kept: functions whose docstring's first paragraph is 20-300 characters and whose code without
    the docstring is 40-1000 characters; duplicates (same code) dropped. ~2,000 pairs on CPython 3.11.
    """
    out, seen = [], set()
    for path in sorted(_stdlib_root().glob("*.py")):
        for qualname, node, lines in _functions(path):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            summary = first_paragraph(doc)
            code = _source_without_docstring(node, lines)
            if not (20 <= len(summary) <= 300 and 40 <= len(code) <= 1000) or code in seen:
                continue
            seen.add(code)
            out.append({"instruction": DOCSTRING_INSTRUCTION, "input": code, "output": summary,
                        "id": f"{path.stem}.{qualname}"})
    return tuple(out)


@functools.lru_cache(maxsize=1)
def python_packages(per_class: int = 200) -> tuple[dict, ...]:
    """Classification records: a function's code (docstring removed) → the package it comes from.

    Up to `per_class` functions per package (the first by content hash, so the choice is stable),
    from the package's own modules (its test folders excluded).
    """
    out = []
    for pkg in PACKAGES:
        rows = []
        for path in sorted((_stdlib_root() / pkg).rglob("*.py")):
            if any(part in ("test", "tests", "idle_test") for part in path.parts):
                continue
            for qualname, node, lines in _functions(path):
                code = _source_without_docstring(node, lines)
                if 40 <= len(code) <= 1000:
                    rows.append({"text": code, "label": pkg, "id": f"{pkg}/{path.name}:{qualname}"})
        rows.sort(key=lambda r: _hash(r["id"]))
        out.extend(rows[:per_class])
    return tuple(out)


# --------------------------------------------------------------------------------------------
# local files and Hugging Face datasets


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_records(path: str | Path) -> tuple[list[tuple[str, dict]], dict[str, list[tuple[str, dict]]] | None]:
    """Records of a .jsonl / .json file, each paired with where it came from ("file:line", "file[i]").

    Returns (records, None), or ([], {"train": [...], "val": [...], "test": [...]}) when a .json file
    gives its own splits.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("dataset file not found", str(path), "pass an existing .jsonl/.json file, python-docstrings or hf:NAME")
    if path.suffix == ".jsonl":
        records = []
        with open(path, "r", encoding="utf-8", errors="strict") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"line {n} is not valid JSON ({exc.msg})", f"{path}:{n}", "write one JSON object per line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"line {n} is a JSON {type(obj).__name__}, not an object", f"{path}:{n}", "write one JSON object per line")
                records.append((f"{path}:{n}", obj))
        return records, None
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg}, line {exc.lineno})", f"{path}:{exc.lineno}", "fix the JSON syntax") from None
        if isinstance(obj, list):
            return _indexed(obj, str(path)), None
        if isinstance(obj, dict) and "train" in obj:
            names = {"train": "train", "validation": "val", "val": "val", "test": "test"}
            splits = {names[k]: _indexed(v, f"{path}[{k}]") for k, v in obj.items() if k in names}
            return [], splits
        raise DataError("a .json dataset must be a list of records or {\"train\": [...], \"validation\": [...]}", str(path),
                        "or use .jsonl, one record per line")
    raise DataError(f"unknown dataset file type '{path.suffix}'", str(path), "use .jsonl or .json")


def _indexed(items, where: str) -> list[tuple[str, dict]]:
    if not isinstance(items, list):
        raise DataError("expected a list of records", where, "write the split as a JSON list of objects")
    out = []
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise DataError(f"record {i} is a JSON {type(obj).__name__}, not an object", f"{where}[{i}]", "each record is a JSON object")
        out.append((f"{where}[{i}]", obj))
    return out


def _hf_records(spec: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """hf:NAME[:CONFIG][@SPLIT] → records (+ label names when the label column is a ClassLabel)."""
    name = spec[3:]
    name, _, split = name.partition("@")
    name, _, conf = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, conf or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network/hub errors come in many types
        raise DataError(f"could not load Hugging Face dataset '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                        spec, "check the name and your network, or download it and pass a local .jsonl") from None
    names = []
    feat = ds.features.get("label") if hasattr(ds, "features") else None
    if feat is not None and hasattr(feat, "names"):
        names = list(feat.names)
    return [(f"{spec}[{i}]", dict(row)) for i, row in enumerate(ds)], names


def _check(records: list[tuple[str, dict]], task: str) -> list[dict]:
    """Every record has its task's fields, as strings (label: str or int); returns plain dicts."""
    need = ("instruction", "output") if task == "instruct" else ("text", "label")
    out = []
    for where, r in records:
        for k in need:
            if k not in r or r[k] is None:
                raise DataError(f"record is missing the field '{k}' (task {task} needs {', '.join(need)})", where,
                                "add the field, or set finetune.task to the task your data is for")
        if task == "instruct":
            for k in ("instruction", "input", "output"):
                if k in r and r[k] is not None and not isinstance(r[k], str):
                    raise DataError(f"field '{k}' must be a string, got {type(r[k]).__name__}", where, "quote it as a JSON string")
            out.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"],
                        "id": str(r.get("id", where))})
        else:
            if not isinstance(r["text"], str):
                raise DataError(f"field 'text' must be a string, got {type(r['text']).__name__}", where, "quote it as a JSON string")
            if not isinstance(r["label"], (str, int)) or isinstance(r["label"], bool):
                raise DataError(f"field 'label' must be a string or an integer, got {type(r['label']).__name__}", where,
                                "use a class name or a class id")
            out.append({"text": r["text"], "label": r["label"], "id": str(r.get("id", where))})
    return out


def detect_task(records: list[tuple[str, dict]], where: str) -> str:
    if not records:
        raise DataError("dataset is empty", where, "give at least two records")
    first = records[0][1]
    if "label" in first:
        return "classify"
    if "instruction" in first:
        return "instruct"
    raise DataError("cannot tell the task: the first record has neither 'instruction' nor 'label'", records[0][0],
                    "instruct records need instruction/input/output, classify records need text/label (or set finetune.task)")


def split_by_hash(records: list[dict], val_fraction: float = 0.05, test_fraction: float = 0.05) -> tuple[list, list, list]:
    """Deterministic 90/5/5 split by a hash of each record's content; train and val never empty (n ≥ 2)."""
    train, val, test = [], [], []
    for r in records:
        u = int(_hash(json.dumps(r, sort_keys=True))[:12], 16) / 16**12  # uniform in [0, 1)
        (val if u < val_fraction else test if u < val_fraction + test_fraction else train).append(r)
    if len(records) >= 2:
        if not val:
            src = train if len(train) > 1 else test
            val.append(src.pop())
        if not train:
            train.append((test or val).pop(0))
    return train, val, test


def load_sft(dataset: str, task: str = "auto", max_examples: int | None = None) -> SFTData:
    """Read `finetune.dataset` into an SFTData (records checked, split, labels in a fixed order)."""
    splits, label_names = None, []
    if dataset == "python-docstrings":
        records = [(f"python-docstrings:{r['id']}", r) for r in python_docstrings()]
    elif dataset == "python-packages":
        records = [(f"python-packages:{r['id']}", r) for r in python_packages()]
        label_names = list(PACKAGES)
    elif dataset.startswith("hf:"):
        records, label_names = _hf_records(dataset)
    else:
        records, splits = read_records(dataset)
    if task == "auto":
        task = detect_task(records or (splits or {}).get("train", []), dataset)
    if splits is not None:
        if not splits.get("train"):
            raise DataError("the dataset has no 'train' records", dataset, "add a non-empty \"train\" list")
        train, val, test = (_check(splits.get(k, []), task) for k in ("train", "val", "test"))
        if not val:
            train, val, _ = split_by_hash(train, 0.05, 0.0)
    else:
        checked = _check(records, task)
        if len(checked) < 2:
            raise DataError(f"dataset has {len(checked)} record(s)", dataset, "give at least two records (one is kept for validation)")
        train, val, test = split_by_hash(checked)
    if max_examples is not None and len(train) > max_examples:  # a hash-chosen subset, in the original order
        chosen = sorted(range(len(train)), key=lambda i: _hash(json.dumps(train[i], sort_keys=True)))[:max_examples]
        train = [train[i] for i in sorted(chosen)]
    labels = []
    if task == "classify":
        if label_names and all(isinstance(r["label"], int) for r in train + val + test):
            labels = label_names
            for r in train + val + test:
                r["label"] = labels[r["label"]]
        else:
            seen = sorted({str(r["label"]) for r in train + val + test})
            labels = [x for x in label_names if x in seen] + [x for x in seen if x not in label_names]
            for r in train + val + test:
                r["label"] = str(r["label"])
        if len(labels) < 2:
            raise DataError(f"classification needs at least two labels, found {labels}", dataset, "check the 'label' column")
    return SFTData(task=task, train=train, val=val, test=test, labels=labels, source=dataset)


# --------------------------------------------------------------------------------------------
# the template, token masks and batches


def format_prompt(record: dict) -> str:
    """The prompt text, ending in '### Response:\\n' (the model continues with the answer)."""
    text = PROMPT_HEADER + f"### Instruction:\n{record['instruction']}\n\n"
    if record.get("input"):
        text += f"### Input:\n{record['input']}\n\n"
    return text + "### Response:\n"


class Encoder:
    """Turns records into token ids with a budget of `max_len` positions per example.

    The prompt is encoded in three pieces — head (template + instruction + '### Input:'), input,
    tail ('### Response:') — so that a too-long example loses the end of its *input*, never the
    template or the answer's start. Training and generation use the same prompt ids.
    """

    def __init__(self, tokenizer, max_len: int):
        self.tok, self.max_len = tokenizer, max_len
        self.eot = tokenizer.eot_id
        if self.eot is None:
            raise DataError("the tokenizer has no <|endoftext|> token", "tokenizer", "train the tokenizer with special_tokens: ['<|endoftext|>']")
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str, cache: bool = False) -> list[int]:
        if cache and text in self._cache:
            return self._cache[text]
        ids = list(self.tok.encode_ordinary(text))
        if cache:
            self._cache[text] = ids
        return ids

    def prompt_ids(self, record: dict, room: int = 0) -> list[int]:
        """Token ids of format_prompt(record), with the input cut so that `room` more tokens fit in max_len."""
        head = PROMPT_HEADER + f"### Instruction:\n{record['instruction']}\n\n"
        if record.get("input"):
            head_ids = self._enc(head + "### Input:\n", cache=True)
            inp, tail = self._enc(record["input"]), self._enc("\n\n### Response:\n", cache=True)
        else:
            head_ids, inp, tail = self._enc(head, cache=True), [], self._enc("### Response:\n", cache=True)
        budget = self.max_len - room - len(head_ids) - len(tail)
        return head_ids + inp[: max(0, budget)] + tail

    def instruct(self, record: dict) -> tuple[list[int], list[int]] | None:
        """(x, y) for next-token training: y = -100 on prompt positions, the response + eot after.

            tokens  p0 p1 p2 r0 r1 eot
            x       p0 p1 p2 r0 r1           (model input, ≤ max_len)
            y       -100 -100 r0 r1 eot      (the token after each x position, prompt ones ignored)
        """
        resp = self._enc(record["output"]) + [self.eot]
        # keep up to half the positions for the answer, give the rest to the prompt
        keep_resp = min(len(resp), max(1, self.max_len // 2))
        prompt = self.prompt_ids(record, room=keep_resp - 1)  # x drops the last token: prompt + answer ≤ max_len + 1
        resp = resp[: self.max_len + 1 - len(prompt)]
        if len(prompt) >= self.max_len + 1 or not resp:
            return None  # the template alone fills the context
        seq = prompt + resp
        x = seq[:-1]
        y = [IGNORE_INDEX] * (len(prompt) - 1) + resp
        return x, y

    def classify(self, record: dict) -> list[int]:
        return self._enc(record["text"])[: self.max_len] or [self.eot]


def encode_instruct(records: list[dict], encoder: Encoder) -> list[tuple[list[int], list[int]]]:
    out = [encoder.instruct(r) for r in records]
    return [e for e in out if e is not None]


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (x, y) pairs to the longest: x with pad_id, y with -100. → (B, L), (B, L) int64."""
    L = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), L), pad_id, dtype=torch.long)
    y = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for i, (xi, yi) in enumerate(examples):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return x, y


def pad_classify(ids: list[list[int]], labels: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ x (B, L) right-padded, last (B,) index of each row's last real token, y (B,) class ids."""
    L = max(len(t) for t in ids)
    x = torch.full((len(ids), L), pad_id, dtype=torch.long)
    for i, t in enumerate(ids):
        x[i, : len(t)] = torch.tensor(t)
    last = torch.tensor([len(t) - 1 for t in ids], dtype=torch.long)
    return x, last, torch.tensor(labels, dtype=torch.long)


def batch_indices(n: int, batch_size: int, index: int, seed: int) -> list[int]:
    """The `index`-th batch of an endless shuffled stream over n examples (a fresh permutation per epoch).

    A pure function of (n, batch_size, index, seed): a resumed run draws the very same batches.
    """
    out = []
    pos = index * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset: offset + take].tolist())
        pos += take
    return out


def label_counts(records: list[dict]) -> Counter:
    return Counter(r["label"] for r in records)
