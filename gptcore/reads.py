"""Which config keys a stage reads, and what each kind does to its result — declared once per engine.

minbpe stores only the merges and derives the vocabulary, so the two cannot disagree; we do the
same for "what determines a result". Every engine (download, tokenizer training, sharding,
pre-training, evaluation, fine-tuning) declares one `Reads`, and both of its consumers derive
from it:

    result_view   every key read, minus `cadence`       -> the pipeline's cache key for the stage
    weights_view  result_view minus `extend`, `report`  -> the engine's resume check (a checkpoint
                                                           of another run is refused) and the
                                                           stable folder a run trains in

    cadence  how often it logs, evaluates, saves, shows progress: never changes the result
    extend   how far it trains (max_steps): a run may continue from an earlier, shorter one
    report   what it measures after training (eval batches, samples): the result, not the weights
    files    keys naming input files (a dataset .jsonl, a `files:` glob, a tokenizer folder): the
             pipeline keys the stage on those files' contents, never on their paths

A key is "section.key", or a whole "section". A test runs each engine on a config that records
every key it touches and checks that all of them are declared here, so a key read but left out of
the key (a stale cache hit) cannot creep back in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reads:
    keys: tuple[str, ...]
    cadence: tuple[str, ...] = ()
    extend: tuple[str, ...] = ()
    report: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # keys whose value may name files (a path, a folder, files:GLOB): keyed by content

    def input_files(self, config) -> list[tuple[str, list[str]]]:
        """(key, the files it names) for each `files` key naming local files; builtin names and hf: give none."""
        import glob
        import os

        flat = config.flat()
        out = []
        for key in self.files:
            value = flat.get(key)
            if not isinstance(value, str) or value.startswith("hf:"):
                continue
            if value.startswith("files:"):
                pattern = os.path.expanduser(value.removeprefix("files:"))
                paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            elif os.path.isdir(value):
                paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(value) for f in fs)
            elif os.path.isfile(value):
                paths = [value]
            else:
                continue  # a builtin name ("python-docstrings", "gpt2") or a path the engine will report missing
            out.append((key, paths))
        return out

    def _read(self, config) -> dict[str, Any]:
        flat = config.flat()
        return {k: v for k, v in flat.items() if k in self.keys or k.split(".", 1)[0] in self.keys}

    def result_view(self, config) -> dict[str, Any]:
        """`section.key -> value` of every key that changes the stage's result."""
        return {k: v for k, v in self._read(config).items() if k not in self.cadence}

    def weights_view(self, config) -> dict[str, Any]:
        """The keys that change the trained weights of a run that is resumed or extended."""
        skip = set(self.extend) | set(self.report)
        return {k: v for k, v in self.result_view(config).items() if k not in skip}

    def covers(self, key: str) -> bool:
        """Whether `section.key` is declared (read, cadence, extend or report)."""
        return any(key == k or key.split(".", 1)[0] == k for k in self.keys + self.cadence + self.extend + self.report)

    def __add__(self, other: "Reads") -> "Reads":
        return Reads(self.keys + other.keys, self.cadence + other.cadence, self.extend + other.extend,
                     self.report + other.report)


def view_hash(view: dict[str, Any]) -> str:
    """sha256 of a view's canonical JSON."""
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()
