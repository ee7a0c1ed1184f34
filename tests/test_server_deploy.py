"""The documented work-pool path on a real Prefect server: `prefect work-pool create`, `prefect deploy --all`
of deployments/prefect.yaml, and a process worker that runs a triggered flow run.

Its own module, so that test_server.py's `kiln serve` process (module-scoped, polling the server every
second) has stopped before the deployments are written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from server_helpers import deployment, small_config, wait_run

pytestmark = pytest.mark.slow


def test_prefect_deploy_of_the_shipped_file_and_a_worker_run(prefect_server, tmp_path, corpus):
    """The documented work-pool path: create the pool, `prefect deploy --all`, run with a process worker."""
    env = prefect_server.env
    prefect = [sys.executable, "-m", "prefect"]
    r = subprocess.run(
        prefect + ["work-pool", "create", "kiln-local", "--type", "process", "--overwrite"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        prefect + ["deploy", "--all", "--no-prompt", "--prefect-file", "deployments/prefect.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    d = deployment(prefect_server, "pipeline")
    assert d["work_pool_name"] == "kiln-local"
    assert d["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert d["parameters"]["config"]["ingest"]["paths"] == ["examples/data"]
    refresh = deployment(prefect_server, "data-refresh")
    assert refresh["schedules"][0]["active"] is False
    assert deployment(prefect_server, "train")["entrypoint"] == "flows/train.py:train_flow"
    label = deployment(prefect_server, "label")
    assert label["entrypoint"] == "flows/label.py:label_flow" and label["parameters"]["section"] == "feedback"
    assert label["parameters"]["config"]["feedback"]["candidates_from"] == "generate"
    hpo = deployment(prefect_server, "hpo")
    assert hpo["entrypoint"] == "flows/hpo/flow.py:hpo_flow" and hpo["parameters"]["config"]["hpo"]["study"] == "demo"

    cfg = small_config(tmp_path / "worker-store", corpus)
    run = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": cfg}}).json()
    worker = subprocess.run(
        prefect + ["worker", "start", "--pool", "kiln-local", "--run-once"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run = wait_run(prefect_server, run["id"], timeout=120)
    assert run["state_type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    assert os.path.isdir(tmp_path / "worker-store" / "ingest")
