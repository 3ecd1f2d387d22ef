"""Every shell block of README.md and docs/*.md runs as written, or its page says why it cannot.

A fenced block whose language is `bash`, `sh` or `shell` is a shell block. Each page's shell blocks run
in order, in one `bash -e -o pipefail` session (a reader's terminal), in a temporary copy of this
checkout (tracked and untracked files, not the ignored ones) whose `.venv` is this test's venv, so
`make install` is a no-op there and `source .venv/bin/activate` works. The session starts the way the
README says a reader starts: `source .venv/bin/activate`, then README's setup block (below). PYTHONPATH
points at the copy, so the copy's code is what runs.

A marker is an HTML comment on the line before a block's fence (blank lines may come between):

    <!-- docs-test: setup -->                       README only: run first in every page's session. It is
                                                     `export GPTCORE_SET="..."`, the small config the pages
                                                     document for a quick try (`gptcore --set`s from the
                                                     environment, before the command line's own)
    <!-- docs-test: slow -->                        this block and the rest of the page run only in
                                                     `make test-all` (a whole pipeline, minutes); CI runs
                                                     each page's blocks up to its first slow one
    <!-- docs-test: skip gpu: REASON -->            not run: needs a CUDA GPU
    <!-- docs-test: skip internet: REASON -->       not run: needs a download (CI and this machine are offline)
    <!-- docs-test: skip interactive: REASON -->    not run: waits for a person (a chat prompt, a UI left
                                                     open in a browser); REASON names the test that covers it

and, on a line of its own anywhere in a page, `<!-- docs-test: after PAGE -->`: PAGE's blocks run first,
in the same copy, because this page uses what they made (such a page runs only in `make test-all`).

A command line ending in a comment `# error: TEXT ...` is one the page shows failing: it must exit 2
with a last stderr line starting `error: TEXT`. A block that is neither runnable nor marked fails here,
and so does a marker that is malformed, a skip without a reason, or a fence without a language (a shell
command must not hide in an unlabelled block).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
SKIP_KINDS = {"gpu": "needs a CUDA GPU", "internet": "needs a download",
              "interactive": "waits for a person"}
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<what>.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[^`\s]*)\s*$")
ERROR_LINE = re.compile(r"^(?P<cmd>\S.*?)\s+#\s*error:\s*(?P<text>.*?)\s*(?:\.\.\.|…)?\s*$")
FAST_TIMEOUT, SLOW_TIMEOUT = 240, 2400


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mark: str | None  # None (run it), "setup", "slow", "skip KIND: REASON"

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Page:
    name: str
    blocks: list[Block]
    after: list[str]
    problems: list[str]

    @property
    def shell(self) -> list[Block]:
        return [b for b in self.blocks if b.lang in SHELL]

    def runnable(self, fast: bool) -> list[Block]:
        out = []
        for b in self.shell:
            if fast and b.mark == "slow":
                break
            if b.mark in (None, "slow"):
                out.append(b)
        return out


def parse(name: str, text: str, known_pages=PAGES) -> Page:
    """The page's fenced blocks with their markers, its `after` pages, and what is wrong with its markers."""
    lines = text.split("\n")
    blocks, after, problems, pending = [], [], [], None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line)
        if m:
            what = m["what"]
            if what.startswith("after "):
                target = what[len("after "):].strip()
                if target not in known_pages or target == name:
                    problems.append(f"{name}:{i + 1}: 'after {target}' names no other page")
                after.append(target)
            else:
                if pending is not None:
                    problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
                pending = (i + 1, what)
        elif (f := FENCE.match(line)) is not None:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"{name}:{i + 1}: fence never closed")
                break
            lang = f["lang"]
            if not lang:
                problems.append(f"{name}:{i + 1}: fence without a language (```bash, ```text, ```python ...)")
            mark = pending[1] if pending else None
            if mark is not None:
                problems += [f"{name}:{i + 1}: {p}" for p in _marker_problems(mark, lang, name)]
            blocks.append(Block(name, i + 1, lang, "\n".join(lines[i + 1:end]), mark))
            pending, i = None, end
        elif line.strip() and pending is not None:
            problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
            pending = None
        i += 1
    return Page(name, blocks, after, problems)


def _marker_problems(mark: str, lang: str, page: str) -> list[str]:
    if lang not in SHELL:
        return [f"marker '{mark}' on a {lang or 'unlabelled'} block (only shell blocks run)"]
    if mark == "slow":
        return []
    if mark == "setup":
        return [] if page == "README.md" else ["only README.md has the setup block"]
    m = re.fullmatch(r"skip (?P<kind>\w+)(?::\s*(?P<reason>.*))?", mark)
    if not m or m["kind"] not in SKIP_KINDS:
        return [f"unknown marker '{mark}': use slow, setup or skip KIND: REASON (KIND: {', '.join(SKIP_KINDS)})"]
    if len(m["reason"] or "") < 10:
        return [f"'skip {m['kind']}' needs a reason (why, and what covers it instead)"]
    return []


def load(name: str) -> Page:
    return parse(name, (REPO / name).read_text(encoding="utf-8"))


def script(blocks: list[Block], setup: list[Block] = ()) -> str:
    """One bash session running `blocks` in order; `$DOCS_AT` names the block running, for the report."""
    out = ["set -eo pipefail",
           'docs_expect_error() {  # CMD TEXT: CMD must exit 2, its last stderr line starting "error: TEXT"',
           '  local err rc; set +e; err=$( { eval "$1"; } 2>&1 >/dev/null ); rc=$?; set -e',
           '  local last="${err##*$\'\\n\'}"',
           '  if [ "$rc" != 2 ] || [[ "$last" != "error: $2"* ]]; then',
           '    echo "expected exit 2 and \'error: $2...\' from: $1 -- got exit $rc: $err" >&2; return 1; fi',
           "}"]
    for b in [*setup, *blocks]:
        out.append(f"echo {shlex.quote(b.where)} > \"$DOCS_AT\"")
        for line in b.text.split("\n"):
            m = ERROR_LINE.match(line)
            out.append(f"docs_expect_error {shlex.quote(m['cmd'])} {shlex.quote(m['text'])}" if m else line)
    return "\n".join(out) + "\n"


def run_session(text: str, cwd: Path, env: dict, timeout: int) -> tuple[int, str, str]:
    """(exit code, the block it stopped in, the log's tail)."""
    at, log = cwd / ".docs-test-at", cwd / ".docs-test.log"
    (cwd / ".docs-test.sh").write_text(text)
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(["bash", ".docs-test.sh"], cwd=cwd, env={**env, "DOCS_AT": str(at)},
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    where = at.read_text().strip() if at.exists() else "(before the first block)"
    return rc, where, log.read_text(errors="replace")[-6000:]


# --------------------------------------------------------------------------------------------
# the copy of the checkout a reader has


def make_checkout(dest: Path) -> Path:
    """A copy of this checkout (git's tracked and untracked, not ignored, files), with `.venv` = this venv."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the docs test runs inside the project's venv (make test does)")
    files = subprocess.run(["git", "ls-files", "-coz", "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file() and not src.is_symlink():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    venv = dest / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".install-stamp":
            (venv / entry.name).symlink_to(entry)
    (venv / ".install-stamp").touch()  # newer than the copied pyproject.toml: `make install` is a no-op
    return dest


def session_env(checkout: Path) -> dict:
    """The reader's environment: nothing of ours pointing elsewhere, Prefect's state inside the copy, and no
    Prefect server on :4200 borrowed from whoever else runs one on this machine."""
    drop = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "GPTCORE_SET", "VIRTUAL_ENV", "GPTCORE_DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST")}
    env.update(PYTHONPATH=str(checkout), PREFECT_HOME=str(checkout / ".prefect-home"), GPTCORE_PROGRESS="0",
               PREFECT_LOCAL_SERVER="http://127.0.0.1:9/api", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false")
    return env


def setup_blocks() -> list[Block]:
    return [b for b in load("README.md").shell if b.mark == "setup"]


def run_page(name: str, fast: bool, tmp_path: Path) -> None:
    page = load(name)
    checkout = make_checkout(tmp_path / "gptcore")
    blocks = [b for p in _after_chain(page) for b in load(p).runnable(False)] + page.runnable(fast)
    prelude = Block("README.md", 0, "bash", "source .venv/bin/activate", None)
    text = script([b for b in blocks if b.mark != "setup"], [prelude, *setup_blocks()])
    rc, where, tail = run_session(text, checkout, session_env(checkout), FAST_TIMEOUT if fast else SLOW_TIMEOUT)
    assert rc == 0, f"the shell block at {where} failed (exit {rc}) in {checkout}:\n{tail}"


def _after_chain(page: Page) -> list[str]:
    out: list[str] = []
    for p in page.after:
        out += [q for q in _after_chain(load(p)) if q not in out] + ([p] if p not in out else [])
    return out


FAST = [p for p in PAGES if not load(p).after and load(p).runnable(True)]
SLOW = [p for p in PAGES if load(p).after or len(load(p).runnable(False)) > len(load(p).runnable(True))]


# --------------------------------------------------------------------------------------------


def test_every_shell_block_is_run_or_marked_with_a_reason():
    problems = [p for name in PAGES for p in load(name).problems]
    assert not problems, "\n".join(problems)
    setup = setup_blocks()
    assert len(setup) == 1 and setup[0].text.startswith("export GPTCORE_SET="), setup
    counted = {name: len(load(name).shell) for name in PAGES}
    assert sum(counted.values()) > 20, counted  # the parser sees the pages' blocks


def test_the_checker_fails_an_unmarked_failing_block_and_a_bad_marker(tmp_path):
    page = parse("x.md", "# x\n\n```bash\necho one\n```\n\n<!-- docs-test: skip gpu -->\n```bash\nnvidia-smi\n```\n\n"
                 "<!-- docs-test: skip cloud: needs a cloud account -->\n```bash\naws s3 ls\n```\n\n```\nhidden\n```\n"
                 "\n```bash\ntrue  # error: no such thing ...\n```\n\n```bash\nfalse\n```\n", known_pages=["x.md"])
    assert [p.split(": ", 1)[1] for p in page.problems] == [
        "'skip gpu' needs a reason (why, and what covers it instead)",
        "unknown marker 'skip cloud: needs a cloud account': use slow, setup or skip KIND: REASON "
        "(KIND: gpu, internet, interactive)",
        "fence without a language (```bash, ```text, ```python ...)"]
    runnable = [b for b in page.runnable(True)]
    assert [b.line for b in runnable] == [3, 21, 25]
    env = dict(os.environ)
    rc, where, _ = run_session(script(runnable[:1]), tmp_path, env, 30)
    assert rc == 0 and where == "x.md:3"
    rc, where, tail = run_session(script(runnable[:2]), tmp_path, env, 30)  # `true` claims an error: caught
    assert rc != 0 and where == "x.md:21" and "expected exit 2" in tail
    rc, where, _ = run_session(script([runnable[0], runnable[2]]), tmp_path, env, 30)
    assert rc != 0 and where == "x.md:25"
    good = parse("y.md", "```bash\nbash -c 'echo \"error: no such thing (y)\" >&2; exit 2'  # error: no such thing ...\n```\n",
                 known_pages=["y.md"])
    assert run_session(script(good.runnable(True)), tmp_path, env, 30)[0] == 0


@pytest.mark.parametrize("name", FAST)
def test_page_runs_as_written_fast_part(name, tmp_path):
    """The blocks of each page up to its first slow one (CI)."""
    run_page(name, True, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_page_runs_as_written(name, tmp_path):
    """Every runnable block of each page, after the pages it builds on (make test-all)."""
    run_page(name, False, tmp_path)


def test_example_outputs_on_the_pages_are_regions_docs_regen_rewrites():
    import importlib.util

    spec = importlib.util.spec_from_file_location("regen", REPO / "docs" / "regen.py")
    regen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regen)
    found = {name: page for page in PAGES for name in regen.regions((REPO / page).read_text(encoding="utf-8"))}
    assert found == {name: page for name, (page, _) in regen.EXAMPLES.items()}
    text = "a\n<!-- regen: x (docs/regen.py) -->\nold\nlines\n<!-- /regen -->\nb\n"
    assert regen.replace_region(text, "x", "new\n") == "a\n<!-- regen: x (docs/regen.py) -->\nnew\n<!-- /regen -->\nb\n"
    with pytest.raises(ValueError):
        regen.replace_region(text, "y", "new\n")
