"""Where the text comes from: a stream of documents (str), one per file / row / topic.

`data.source` names one of three sources; each is a generator, so nothing is loaded whole:

    python-stdlib           this interpreter's standard-library .py files (sorted by path), then the
                            English pydoc topics (sorted by name). Offline, on every machine.
    hf:NAME[:CONFIG][@SPLIT]
                            any Hugging Face dataset, streamed: hf:HuggingFaceFW/fineweb-edu:sample-10BT
    files:GLOB              local .txt (one document per file), .jsonl and .parquet (one per row),
                            read by `datasets`' own loaders, streamed too.

`data.max_bytes` caps the UTF-8 bytes of any source (the document that crosses the cap is cut).
`download()` materialises the capped stream as a JSONL file, the pipeline's cacheable first stage.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from gptcore.errors import DataError
from gptcore.fileio import atomic_file
from gptcore.reads import Reads

# what `download` reads (gptcore/reads.py): the source, the cap, the JSON field of the text
READS = Reads(keys=("data.source", "data.max_bytes", "data.text_field"), files=("data.source",))

# stdlib folders that are tests, test data or third-party code rather than library source
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_order_key(name: str) -> str:
    """Where a document named `name` ("file:json/decoder.py", "topic:assert") sits in the corpus."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def python_stdlib_documents() -> Iterator[str]:
    """Every readable stdlib `.py` file and every English pydoc topic, one document each.

    The order is deterministic but not alphabetical: documents are sorted by a hash of their name
    (`stdlib_order_key`), so a `data.max_bytes` prefix is a fair sample of the whole library — code
    from every package, prose from the pydoc topics — rather than its alphabetically first folders.
    The 65 codec tables in `encodings/` that `gencodec.py` generated (1.2 MB of hex literals, a tenth
    of the library) are left out: they are machine output, and a small model learns to recite them.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    names = []
    for folder, dirs, files in os.walk(root):  # pruned walk: never descends into site-packages or tests
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]
        rel = Path(folder).relative_to(root)
        names += [("file:" + (rel / f).as_posix(), Path(folder, f)) for f in files if f.endswith(".py")]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    names += [("topic:" + name, name) for name in topics]
    for name, item in sorted(names, key=lambda n: stdlib_order_key(n[0])):
        if name.startswith("topic:"):
            text = topics[item]
        else:
            try:
                text = item.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):  # unreadable or not UTF-8: skip
                continue
            if _GENERATED_CODEC in text[:300]:
                continue
        if text.strip():
            yield text


_GENERATED_CODEC = "with gencodec.py"  # first docstring line of encodings/cp1250.py and its kin


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """`"hf:NAME[:CONFIG][@SPLIT]"` -> (name, config, split).

    >>> parse_hf_source("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train")
    ('HuggingFaceFW/fineweb-edu', 'sample-10BT', 'train')
    """
    spec = source.removeprefix("hf:")
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name:
        raise DataError("no dataset name", f"data.source={source}", "write hf:NAME[:CONFIG][@SPLIT], e.g. hf:roneneldan/TinyStories")
    return name, config or None, split or "train"


def _rows_text(rows: Iterable[dict], text_field: str, source: str) -> Iterator[str]:
    """The `text_field` column of a stream of rows, with a clear error when it is missing."""
    for i, row in enumerate(rows):
        if text_field not in row:
            raise DataError(
                f"no column '{text_field}' (columns: {', '.join(map(str, row)) or 'none'})",
                source, f"set data.text_field to the column holding the text, e.g. --set data.text_field={next(iter(row), 'text')}",
            )
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"column '{text_field}' holds {type(text).__name__}, not text (row {i})", source,
                            "set data.text_field to a column of strings")
        yield text


def hf_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Stream `text_field` of a Hugging Face dataset named `hf:NAME[:CONFIG][@SPLIT]`."""
    import datasets

    name, config, split = parse_hf_source(source)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # network, unknown name/config/split: datasets raises many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot open dataset: {first}", source,
                        "check NAME, CONFIG and SPLIT on huggingface.co and that the Hub is reachable (HF_HUB_OFFLINE unset)") from None
    yield from _rows_text(ds, text_field, source)


_LOADERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def files_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Stream local files matched by `files:GLOB` through `datasets`' text/json/parquet loaders.

    A .txt file is one document; a .jsonl/.parquet row is one document (its `text_field`).
    Files are read in sorted order, grouped by loader.
    """
    import datasets

    pattern = os.path.expanduser(source.removeprefix("files:"))
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError("no files match", source, "check the glob (quote it in the shell), e.g. files:'data/**/*.txt'")
    unknown = sorted({Path(p).suffix for p in paths} - set(_LOADERS))
    if unknown:
        raise DataError(f"unsupported file type(s) {', '.join(unknown) or '(no extension)'}", source,
                        f"use {', '.join(sorted(_LOADERS))} files, or narrow the glob")
    for loader in dict.fromkeys(_LOADERS[Path(p).suffix] for p in paths):  # first-seen order, stable
        group = [p for p in paths if _LOADERS[Path(p).suffix] == loader]
        kwargs = {"sample_by": "document", "keep_linebreaks": True} if loader == "text" else {}
        try:
            ds = datasets.load_dataset(loader, data_files=group, split="train", streaming=True, **kwargs)
            yield from _rows_text(ds, text_field, source)
        except DataError:
            raise
        except Exception as exc:  # undecodable bytes, malformed JSON/parquet
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read {loader} files: {first}", source, "check the files are UTF-8 text / valid JSON lines / parquet") from None


def cap_bytes(documents: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Stop after `max_bytes` UTF-8 bytes; the document that crosses the cap is cut to fit."""
    if max_bytes is None:
        yield from documents
        return
    left = max_bytes
    for doc in documents:
        data = doc.encode("utf-8")
        if len(data) >= left:
            cut = data[:left].decode("utf-8", errors="ignore")  # never split a character
            if cut:
                yield cut
            return
        left -= len(data)
        yield doc


def iter_documents(data) -> Iterator[str]:
    """The documents of `data.source` (a config DataSection), non-empty, capped at `data.max_bytes`."""
    source = data.source
    if source == "python-stdlib":
        docs = python_stdlib_documents()
    elif source.startswith("hf:"):
        docs = hf_documents(source, data.text_field)
    elif source.startswith("files:"):
        docs = files_documents(source, data.text_field)
    else:
        raise DataError(f"unknown data source '{source}'", "data.source", "use python-stdlib, hf:NAME[:CONFIG][@SPLIT] or files:GLOB")
    return cap_bytes((d for d in docs if d), data.max_bytes)


# --------------------------------------------------------------------------------------------
# the materialised corpus: one JSON object {"text": ...} per line


def download(data, out_file: str | Path) -> dict:
    """Write the (capped) documents of `data.source` to `out_file` as JSONL, atomically.

    Returns {"path", "sha256", "bytes" (UTF-8 bytes of the texts), "documents"}.
    """
    out_file = Path(out_file)
    h, nbytes, ndocs = hashlib.sha256(), 0, 0
    with atomic_file(out_file) as f:
        for doc in iter_documents(data):
            line = (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            h.update(line)
            nbytes += len(doc.encode("utf-8"))
            ndocs += 1
        if ndocs == 0:
            raise DataError("the source yielded no documents", data.source,
                            "point data.source at non-empty text (or raise data.max_bytes)")
    return {"path": str(out_file), "sha256": h.hexdigest(), "bytes": nbytes, "documents": ndocs}


def read_jsonl_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Stream the texts of a JSONL corpus written by `download` (or any {"text": ...} lines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("corpus file not found", str(path), "run the download stage first")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"line {lineno} is not JSON ({exc.msg})", str(path), "re-run the download stage") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise DataError(f"line {lineno} has no string '{text_field}'", str(path), "each line must be {\"text\": \"...\"}")
            if row[text_field]:
                yield row[text_field]
