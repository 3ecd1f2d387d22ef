"""The shape of the code: imports run one way, public names keep working, one declaration of the keys.

- No import cycle inside gptcore/, counting imports inside functions (lazy) and package __init__s.
- gptcore/ never imports prefect or mlflow (cli.py alone may reach flows/, lazily).
- The public imports users and checks rely on still import, and the old flat module names are
  aliases of the modules that hold their code now.
- Every config key an engine reads is declared in its `Reads` (run on a config that records reads).
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from gptcore.config import Config, config_from_dict

ROOT = Path(__file__).resolve().parents[1] / "gptcore"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every gptcore module `path` imports, anywhere in the file (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import gptcore.x.y` names y; a name inside a module names the module
                t = t.rpartition(".")[0]
            if t.startswith("gptcore") and t != "gptcore":
                out.add(t)
    return out


def test_no_import_cycles_counting_lazy_imports():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(p, m, known) - {m} for m, p in mods.items()}
    # importing gptcore.a.b from outside gptcore.a first runs gptcore/a/__init__.py: an edge to it too
    for m in list(graph):
        for target in list(graph[m]):
            parts = target.split(".")
            for i in range(2, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in known and not (m == pkg or m.startswith(pkg + ".")):
                    graph[m].add(pkg)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_library_never_imports_prefect_or_mlflow():
    for name, path in _modules().items():
        if name == "gptcore.cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("prefect", "mlflow", "flows", "tasks") for n in names), (name, names)


def test_public_imports_and_old_module_names():
    from gptcore.checkpoint import load_model, save_model  # noqa: F401
    from gptcore.convert import load_hf_gpt2  # noqa: F401
    from gptcore.data import read_shard, write_shard  # noqa: F401
    from gptcore.lora import apply_lora, lora_state_dict, merge_lora  # noqa: F401
    from gptcore.model import GPT, GPTConfig  # noqa: F401
    from gptcore.tokenizer import BPETokenizer  # noqa: F401

    from gptcore import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from gptcore.finetune import finetune  # noqa: F401  (the old flat names)
    from gptcore.train import pretrain, train_step  # noqa: F401


def test_each_package_says_which_project_and_page_it_serves():
    for pkg in ("tokenizer", "model", "data", "training", "evaluation", "finetuning", "convert"):
        doc = importlib.import_module(f"gptcore.{pkg}").__doc__ or ""
        pages = re.findall(r"docs/[\w.-]+\.md", doc)
        assert "Project" in doc and pages, pkg
        for page in pages:
            assert (ROOT.parent / page).is_file(), (pkg, page)


# ---------------------------------------------------------------------------------------------
# one declaration of the keys each engine reads


class _Recorder:
    """A config stand-in that records every `section.key` read through it."""

    def __init__(self, config: Config, seen: set[str], section: str | None = None):
        self._c, self._seen, self._s = config, seen, section

    def __getattr__(self, name: str):
        value = getattr(self._c, name)
        if self._s is None:
            if name in Config.model_fields:
                return _Recorder(value, self._seen, name)
            return value
        self._seen.add(f"{self._s}.{name}")
        return value

    def flat(self):
        return self._c.flat()


def _tiny(tmp_path, **over):
    d = {"data": {"max_bytes": 60_000, "num_proc": 1, "val_fraction": 0.2, "shard_tokens": 20_000},
         "tokenizer": {"vocab_size": 300}, "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 256},
         "train": {"max_steps": 2, "batch_size": 2, "block_size": 32, "eval_batches": 1, "num_threads": 1, "progress": False},
         "finetune": {"max_steps": 2, "max_examples": 24, "batch_size": 2, "eval_batches": 1, "num_samples": 1},
         "eval": {"sample_tokens": 4}}
    for k, v in over.items():
        d.setdefault(k, {}).update(v)
    return config_from_dict(d)


def test_every_key_an_engine_reads_is_in_its_reads(tmp_path):
    from gptcore.data.sharding import prepare
    from gptcore.finetuning import finetune as ft
    from gptcore.training import pretrain as pt

    cfg = _tiny(tmp_path)
    prepare(cfg, tmp_path / "data")
    for mod, call in ((pt, lambda c: pt.pretrain(c, tmp_path / "data", tmp_path / "pre")),
                      (ft, lambda c: ft.finetune(c, tmp_path / "pre" / "final", tmp_path / "ft"))):
        seen: set[str] = set()
        call(_Recorder(cfg, seen))
        assert {"run.seed", "train.grad_clip"} <= seen, (mod.__name__, sorted(seen))  # the recorder sees reads
        missing = sorted(k for k in seen if not mod.READS.covers(k))
        assert not missing, f"{mod.__name__} reads {missing} but its READS does not declare them (a stale cache hit)"


def test_reads_views_cadence_extend_report():
    from gptcore.finetuning.finetune import READS as FT
    from gptcore.training.pretrain import READS as PT

    a = config_from_dict({})
    for key, value, result, weights in [
        ("train.log_every", 3, False, False), ("train.eval_every", 7, False, False), ("train.ckpt_every", 9, False, False),
        ("train.progress", False, False, False), ("train.max_steps", 999, True, False),
        ("train.eval_batches", 3, True, False), ("train.lr", 0.5, True, True), ("model.rope_theta", 500.0, True, True),
        ("run.name", "other", False, False), ("finetune.lr", 0.5, False, False),
    ]:
        b = config_from_dict({}, [f"{key}={value}"])
        assert (PT.result_view(a) != PT.result_view(b)) == result, key
        assert (PT.weights_view(a) != PT.weights_view(b)) == weights, key
    for key, value, result in [("train.grad_clip", 0.5, True), ("train.beta2", 0.9, True), ("train.dtype", "bfloat16", True),
                               ("eval.sample_tokens", 9, True), ("finetune.log_every", 3, False), ("train.lr", 0.5, False)]:
        b = config_from_dict({}, [f"{key}={value}"])
        assert (FT.result_view(a) != FT.result_view(b)) == result, key


def test_model_section_is_derived_from_gptconfig():
    import dataclasses

    from gptcore.config import ModelSection
    from gptcore.model import GPTConfig
    from gptcore.training.plan import model_config

    assert {f.name for f in dataclasses.fields(GPTConfig)} | {"preset"} == set(ModelSection.model_fields)
    cfg = config_from_dict({}, ["model.pos=rope", "model.rope_theta=500000"])
    assert model_config(cfg, 300).rope_theta == 500000.0
