"""What torchrun starts on every rank: `python -m gptcore.training.worker ENGINE CONFIG.json ARGS... SUMMARY.json`.

    pretrain CONFIG.json DATA_DIR OUT_DIR SUMMARY.json
    finetune CONFIG.json BASE_DIR OUT_DIR SUMMARY.json

Each rank joins the process group torchrun describes (RANK, WORLD_SIZE, ...) inside the engine,
trains, and rank 0 writes the summary. A failure is written to `<dir of CONFIG.json>/error-rank{R}.json`
first — a user error as its one line, anything else as the last line of its traceback — so the
launcher can report which rank failed and why (gptcore/training/launch.py).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    from gptcore.config import Config
    from gptcore.errors import GptcoreError
    from gptcore.fileio import atomic_write_json
    from gptcore.training.launch import record_failure

    engine, cfg_file, *args, summary_file = argv
    rank = int(os.environ.get("RANK", "0"))
    launch_dir = Path(cfg_file).parent
    try:
        config = Config.model_validate_json(Path(cfg_file).read_text())
        if engine == "pretrain":
            from gptcore.training.pretrain import pretrain

            summary = pretrain(config, *args)
        elif engine == "finetune":
            from gptcore.finetuning.finetune import finetune

            summary = finetune(config, *args)
        else:
            raise SystemExit(f"unknown engine {engine!r}")
        if rank == 0:
            atomic_write_json(summary_file, {k: v for k, v in summary.items() if k != "samples"} | {
                "samples": summary.get("samples", [])})
        return 0
    except GptcoreError as exc:
        record_failure(launch_dir, rank, exc.message())
        return 2
    except BaseException as exc:  # noqa: BLE001 - reported, then re-raised for torchrun's own log
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        record_failure(launch_dir, rank, last)
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
