"""One error type for everything a user can get wrong.

A `GptcoreError` carries three parts — what went wrong, where (a file, a config key, a value) and
what to do — so the CLI can print the one line our conventions promise:

    error: <what> (<where>): <what to do>

Library code raises it (or a subclass) for bad input; `SetupError` is the environment's share (a
full disk, an unwritable folder, a server that does not answer), and `environment_errors()` turns
such a failure, however a library wrapped it, into that one line. Anything else escaping to the
CLI is a bug and is shown with its traceback only under `--debug`.
"""

from __future__ import annotations

import contextlib
import errno
import re
from typing import Iterator


class GptcoreError(Exception):
    """A user-facing error: `what` happened at `where`; `fix` says what to do about it."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.message())

    def message(self) -> str:
        msg = self.what
        if self.where:
            msg += f" ({self.where})"
        if self.fix:
            msg += f": {self.fix}"
        return msg


class ConfigError(GptcoreError, ValueError):
    """An unknown config key, a wrong type or an impossible value."""


class DataError(GptcoreError, ValueError):
    """An empty or binary corpus, a damaged shard, a malformed dataset."""


class CheckpointError(GptcoreError, ValueError):
    """A missing, truncated, corrupt or mismatched checkpoint/tokenizer file."""


class SetupError(GptcoreError):
    """The machine, not the input: a full disk, an unwritable or missing folder, a server that does
    not answer. Retrying cannot help; the fix is outside gptcore."""


_KEPT = "and rerun: finished checkpoints and cached stages are kept"
# (errno values, words in the message of an error that carries no errno, what, fix)
_ENVIRONMENT = (
    ({errno.ENOSPC}, ("No space left on device", "os error 28", "database or disk is full",
                      "PytorchStreamWriter failed writing"),
     "no space left on device", f"free space there (or point tracking.result_store / MLFLOW_TRACKING_URI at a bigger disk) {_KEPT}"),
    ({errno.EDQUOT}, ("Disk quota exceeded", "os error 122"),
     "disk quota exceeded", f"free space or raise the quota {_KEPT}"),
    ({errno.EROFS}, ("Read-only file system", "os error 30", "attempt to write a readonly database"),
     "the file system is read-only", f"point tracking.result_store / MLFLOW_TRACKING_URI at a writable folder {_KEPT}"),
)

# MLflow's words once its HTTP client has given up on the tracking server (refused, timed out, 5xx)
_UNANSWERED = re.compile(r"API request to (https?://[^/\s]+)\S* failed with (?:timeout )?exception")


def environment_error(exc: BaseException, where: str | None = None) -> SetupError | None:
    """The one-line `SetupError` for a failure of the environment anywhere in `exc`'s chain (an
    OSError's errno, or the message of a library that wraps it: safetensors, torch, SQLite, MLflow's
    HTTP client), naming the file (the server) when the error does, else `where`. None for anything else."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SetupError):
            return e
        code, text = getattr(e, "errno", None) if isinstance(e, OSError) else None, str(e)
        if m := _UNANSWERED.search(text):
            return SetupError("the MLflow tracking server stopped answering", m.group(1),
                              f"start it again (or unset MLFLOW_TRACKING_URI for a local sqlite store) {_KEPT}")
        for codes, words, what, fix in _ENVIRONMENT:
            if code in codes or any(w in text for w in words):
                return SetupError(what, getattr(e, "filename", None) or where, fix)
        stack += [e.__context__, e.__cause__]
    return None


@contextlib.contextmanager
def environment_errors(where: str | None = None) -> Iterator[None]:
    """Turn a failure of the environment inside the block into its one-line `SetupError`.

        with environment_errors(out_dir):
            save_checkpoint(...)      # ENOSPC -> SetupError("no space left on device (...)")
    """
    try:
        yield
    except GptcoreError:
        raise
    except Exception as exc:
        err = environment_error(exc, where)
        if err is None:
            raise
        raise err from exc
