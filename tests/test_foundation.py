"""The project's ground rules: layering, CLI error handling, an installable package."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_orchestration():
    """gptcore/ is plain PyTorch: only cli.py may reach flows/ (lazily), nothing imports prefect/mlflow."""
    offenders = []
    for path in sorted((REPO / "gptcore").rglob("*.py")):
        banned = {"prefect", "mlflow"} | ({"flows", "tasks"} if path.name != "cli.py" else set())
        bad = _imports(path) & banned
        if bad:
            offenders.append(f"{path.relative_to(REPO)}: {sorted(bad)}")
    assert not offenders, offenders


def test_cli_module_imports_quickly_without_orchestration():
    code = "import sys, gptcore.cli; print(any(m.split('.')[0] in ('prefect','mlflow') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_help_and_unknown_verb():
    ok = subprocess.run([sys.executable, "-m", "gptcore.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "gptcore" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gptcore.cli", "no-such-verb"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr


def test_user_error_is_one_line_without_traceback(tmp_path):
    """A GptcoreError raised inside any verb becomes `error: what (where): fix`, exit 2."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        "from gptcore.cli import app\n"
        "from gptcore.errors import ConfigError\n"
        "@app.command('probe-error')\n"
        "def probe():\n"
        "    raise ConfigError('bad thing', 'x.yaml', 'do this')\n"
        "sys.argv = ['gptcore', 'probe-error']\n"
        "app()\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: bad thing (x.yaml): do this"


def _modes(root: Path) -> dict[str, int]:
    import stat

    return {p.relative_to(root).as_posix() or ".": stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_outputs_are_readable_files_and_folders_respecting_the_umask(tmp_path):
    """mkdtemp (0700), mkstemp and safetensors (0600) do not leak into what we write: a model folder
    is 0755 with 0644 files under umask 022, and 0750 / 0640 under umask 027."""
    import os

    import torch

    from gptcore.fileio import atomic_write_text
    from gptcore.model.folder import save_model
    from gptcore.model.gpt import GPTConfig, build_model
    from gptcore.tokenizer import BPETokenizer

    tok = BPETokenizer.train("hello world " * 50, vocab_size=270)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    torch.manual_seed(0)
    old = os.umask(0o022)
    try:
        for mask, want_dir, want_file in [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)]:
            os.umask(mask)
            out = save_model(model, tok, tmp_path / f"m{mask:o}")
            atomic_write_text(out / "notes.txt", "x")
            modes = _modes(out)
            assert {k: v for k, v in modes.items() if (out / k).is_dir()} == {".": want_dir, "tokenizer": want_dir}
            assert set(v for k, v in modes.items() if (out / k).is_file()) == {want_file}, modes
    finally:
        os.umask(old)


# ---- gptcore/cpus.py: thread defaults -----------------------------------------------------------


def test_physical_cores_count_hyperthreads_once():
    import os

    import psutil

    from gptcore.cpus import physical_cores, torch_threads

    if len(os.sched_getaffinity(0)) == psutil.cpu_count(logical=True):  # no affinity mask: psutil's count is ours
        assert physical_cores() == psutil.cpu_count(logical=False)
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
    assert torch_threads(1, environ={}) == physical_cores()
    assert torch_threads(physical_cores() * 4, environ={}) == 1  # many ranks: one thread each, never zero
    assert torch_threads(1, environ={"OMP_NUM_THREADS": "3"}) == 3  # the user's choice wins


def test_importing_gptcore_makes_openmp_threads_wait_passively():
    import os
    import subprocess
    import sys

    code = "import os, gptcore, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[0] == "PASSIVE", r.stderr
    r = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.split()[0] == "ACTIVE"  # a user's setting is kept
