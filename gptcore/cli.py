"""The `gptcore` command line: verb groups, each verb thin over one library function.

    gptcore tokenizer train|encode|decode|export-tiktoken     (gptcore.tokenizer)
    gptcore prepare                                           (gptcore.data)
    gptcore pretrain | plan | evaluate                        (gptcore.train, gptcore.evaluate)
    gptcore finetune                                          (gptcore.finetune)
    gptcore generate | convert from-hf|to-hf                  (gptcore.model, gptcore.convert)
    gptcore run | deploy                                      (flows/, imported lazily)

A user error (`GptcoreError`) prints `error: <what> (<where>): <what to do>` and exits 2; Ctrl-C
exits 130 and SIGTERM 143, cleanly. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.29 vendors its own click; Abort and Exit live in typer.exceptions
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import Abort, ClickException, Exit

from gptcore.errors import GptcoreError

_DEBUG = {"on": os.environ.get("GPTCORE_DEBUG", "") not in ("", "0")}


class Terminated(BaseException):
    """SIGTERM, turned into an exception so `finally` blocks and servers shut down normally."""


def _on_sigterm(signum, frame):
    raise Terminated()


def fail(what: str, where: str | None = None, fix: str | None = None) -> None:
    raise GptcoreError(what, where, fix)


class _App(typer.Typer):
    """A typer app whose entry point turns user errors and signals into exit codes, no traceback."""

    def __call__(self, *args, **kwargs):
        if "--debug" in sys.argv[1:]:
            _DEBUG["on"] = True
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except GptcoreError as exc:
            if _DEBUG["on"]:
                traceback.print_exc()
            print(f"error: {exc.message()}", file=sys.stderr)
            sys.exit(2)
        except Abort:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Terminated:
            print("terminated", file=sys.stderr)
            sys.exit(143)
        except ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except Exit as exc:
            sys.exit(exc.exit_code)
        except (BrokenPipeError,):
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = _App(
    name="gptcore",
    help="GPT-2 from scratch: tokenizer, model, pre-training, evaluation, LoRA fine-tuning, pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors.")) -> None:
    if debug:
        _DEBUG["on"] = True


SetOpt = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable).")


def _load_config(path: Optional[Path], overrides: Optional[List[str]]):
    from gptcore.config import load_config

    return load_config(path, overrides or [])


# === section: tokenizer (issue 3) ============================================================

# === section: model, generate, convert (issue 4) =============================================

# === section: data / prepare (issue 5) =======================================================

# === section: pretrain, plan, evaluate (issue 6) =============================================

# === section: finetune (issue 7) =============================================================

# === section: run, deploy (issue 8) ==========================================================


if __name__ == "__main__":
    app()
