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
