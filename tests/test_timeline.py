"""GPTCORE_TIMELINE (flows/timeline.py): one `gptcore run`, its points in order, and the Prefect API
requests and MLflow calls it lists agree with what Prefect and MLflow recorded.

Runs tests/pipeline_fakes.py (the real CLI, flows and temporary Prefect server, quick stand-ins for
the library's work), like tests/test_pipeline_cli.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FAKES = Path(__file__).resolve().parent / "pipeline_fakes.py"
TINY = ["--set", "data.max_bytes=3000", "--set", "train.max_steps=6", "--set", "finetune.max_steps=3"]
STAGES = ("download", "train_tokenizer", "shard", "pretrain", "evaluate", "finetune", "register")


def test_the_timeline_of_one_run(tmp_path):
    (tmp_path / "c.yaml").write_text("run: {name: t}\n")
    log = tmp_path / "timeline.log"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", GPTCORE_TIMELINE=str(log))
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, str(FAKES), "run", "c.yaml", *TINY], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    marks = [(float(t), label) for t, label in (line.split(" ", 1) for line in log.read_text().splitlines())]
    times = [t for t, _ in marks]
    assert times == sorted(times) and 0 < times[0] < times[-1] < 300

    order = ["cli: run", "cli: preflight done", "server: launched", "imports: flows.pipeline", "mlflow: store open",
             "server: healthy", "flow: pipeline body"]
    order += [f"stage {s}: {what}" for s in STAGES for what in ("start", "key and MLflow run", "task", "end")]
    order += ["flow: pipeline body done", "flow: returned", "server: stopped", "atexit: last handler"]
    seen = [next(i for i, (_, label) in enumerate(marks) if label.startswith(want)) for want in order]
    assert seen == sorted(seen), [order[i] for i in range(len(order)) if seen[i] != sorted(seen)[i]]

    # what Prefect's server answered: 4 flow runs created (the pipeline and its 3 sub-flows)
    api = [label.split() for _, label in marks if label.startswith("api ")]
    assert all(a[-1].isdigit() for a in api), api
    assert sum(1 for a in api if a[1:3] == ["POST", "/api/flow_runs/"] and a[-1] == "201") == 4

    # the MLflow runs it lists creating are the runs the store holds: the pipeline's and one per stage
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    held = c.search_runs([c.get_experiment_by_name("t").experiment_id])
    assert sum(1 for _, label in marks if label.startswith("mlflow create_run ")) == len(held) == 1 + len(STAGES)
