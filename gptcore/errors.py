"""One error type for everything a user can get wrong.

A `GptcoreError` carries three parts — what went wrong, where (a file, a config key, a value) and
what to do — so the CLI can print the one line our conventions promise:

    error: <what> (<where>): <what to do>

Library code raises it (or a subclass) for bad input; anything else escaping to the CLI is a bug
and is shown with its traceback only under `--debug`.
"""

from __future__ import annotations


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
