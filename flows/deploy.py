"""`gptcore deploy`: create the work pools and register prefect.yaml's deployments.

    export PREFECT_API_URL=http://127.0.0.1:4200/api    # a running `prefect server start`
    gptcore deploy                                        # pools cpu + gpu, three deployments

It shells out to `prefect deploy` (prefect.yaml is the one description of the deployments) with
GPTCORE_ROOT set to this checkout, which the deployments' pull step makes the working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

import tasks  # noqa: F401  (offline defaults)
from gptcore.errors import ConfigError, GptcoreError

ROOT = Path(__file__).resolve().parents[1]


def _ensure_pool(client, name: str) -> bool:
    """Create process work pool `name` unless it exists; True when created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    try:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        return True
    except ObjectAlreadyExists:
        return False


def _flow_name(deployment: dict) -> str:
    """The Prefect flow name behind a prefect.yaml entry (its entrypoint's @flow(name=...))."""
    import importlib

    path, _, attr = deployment["entrypoint"].partition(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr).name


def deploy(names: list[str] | tuple[str, ...] = (), root: Path = ROOT) -> list[str]:
    """Register the deployments in `root`/prefect.yaml (all, or those in `names`); returns report lines."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise GptcoreError("no Prefect server configured", "PREFECT_API_URL",
                           "start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    known = [d["name"] for d in spec["deployments"]]
    for n in names:
        if n not in known:
            raise ConfigError(f"unknown deployment '{n}'", "--name", f"deployments: {', '.join(known)}")
    chosen = [d for d in spec["deployments"] if not names or d["name"] in names]
    lines = []
    with get_client(sync_client=True) as client:
        for pool in dict.fromkeys(d["work_pool"]["name"] for d in chosen):
            lines.append(f"work pool {pool}: {'created' if _ensure_pool(client, pool) else 'exists'}")
    prefect = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    args = ["--all"] if not names else [a for n in names for a in ("--name", n)]
    env = dict(os.environ, GPTCORE_ROOT=str(root))
    r = subprocess.run(prefect + args, cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise GptcoreError(f"prefect deploy failed: {tail[0]}", str(root / "prefect.yaml"), "fix the file or the server, then retry")
    lines += [f"deployment {_flow_name(d)}/{d['name']} -> pool {d['work_pool']['name']}" for d in chosen]
    lines.append(f"start a worker: prefect worker start --pool {chosen[0]['work_pool']['name']}")
    lines.append(f"trigger a run:  prefect deployment run {_flow_name(chosen[0])}/{chosen[0]['name']} --watch")
    return lines
