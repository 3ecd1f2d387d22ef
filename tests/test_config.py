from pathlib import Path

import pytest

from gptcore.config import load_config, parse_override
from gptcore.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=3e-4", "model.qk_norm=true", "data.max_bytes=1000", "model.block_size=64"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.qk_norm is True
    assert cfg.data.max_bytes == 1000
    assert cfg.model.overrides() == {"block_size": 64, "qk_norm": True}


def test_unknown_key_names_key_and_allowed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.max_step" in msg and "max_steps" in msg and str(p) in msg


def test_unknown_section_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section 'trian'"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="tokenizer.backend"):
        load_config(None, ["tokenizer.backend=wordpiece"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=ftp://x"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_override_parsing():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a.b=hello") == (["a", "b"], "hello")
    with pytest.raises(ConfigError):
        parse_override("ab")


def test_shipped_configs_are_valid():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(p)


def test_run_checks_the_whole_config_before_any_stage(run_cli):
    """A model shape that cannot work, or --until a stage --base never runs, is one error line before Prefect starts."""
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    r = run_cli("run", cfg, "--set", "model.n_embd=100", "--set", "model.n_head=3", timeout=120)
    assert r.returncode == 2 and "n_embd must be a multiple of n_head" in r.stderr and "Traceback" not in r.stderr
    assert "[gptcore]" not in r.stderr  # no stage ran
    r = run_cli("run", cfg, "--base", cfg.parent, "--until", "pretrain", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --until pretrain never happens with --base")


def test_gptcore_set_environment_overrides_come_before_the_command_line(run_cli):
    """$GPTCORE_SET (what the docs test uses to shrink the pages' commands) acts like `--set`s placed
    before the command line's own, and is named on stderr."""
    repo = Path(__file__).resolve().parents[1]
    cfg = repo / "configs" / "tiny.yaml"
    by_flag = run_cli("plan", cfg, "--set", "model.n_layer=2", "--set", "train.batch_size=4")
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = run_cli("plan", cfg, env={"GPTCORE_SET": "model.n_layer=2 'train.batch_size=4'"})
    assert by_env.returncode == 0 and _plan(by_env) == _plan(by_flag)
    assert by_env.stderr.splitlines() == ["GPTCORE_SET: model.n_layer=2 train.batch_size=4"]
    plain = run_cli("plan", cfg)
    assert "2 layers" in by_flag.stdout and "4 layers" in plain.stdout and plain.stdout != by_flag.stdout
    wins = run_cli("plan", cfg, "--set", "model.n_layer=4", env={"GPTCORE_SET": "model.n_layer=2"})
    assert _plan(wins) == _plan(plain)  # the command line wins
    bad = run_cli("plan", cfg, env={"GPTCORE_SET": "train.nope=1"})
    assert bad.returncode == 2 and "train.nope" in bad.stderr and "Traceback" not in bad.stderr


def _plan(proc) -> list[str]:
    """`gptcore plan`'s lines that depend on the config only (free memory and measured speed move between calls)."""
    return [ln for ln in proc.stdout.splitlines() if ln.startswith(("model ", "parameters", "tokens / step"))]
