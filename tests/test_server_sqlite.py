"""Prefect's SQLite default, still right for one person: `prefect server start` with no database setting
(the README's quick start), the file `kiln run` also writes when no server runs. A pipeline run reported
to it is recorded whole. The shared server's tests run on PostgreSQL (test_server*.py, `prefect_server`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from flows.server import PrefectServer

from conftest import REPO, RealServer, _free_port, client_env, server_env
from server_helpers import small_config, task_states

pytestmark = pytest.mark.slow


def test_a_pipeline_run_is_recorded_on_the_sqlite_default(tmp_path, corpus):
    home = tmp_path / "home"
    home.mkdir()
    env = server_env(str(home))
    with open(tmp_path / "server.log", "w") as log:
        server = PrefectServer(None, "127.0.0.1", _free_port(), env=env, stdout=log)
    try:
        server.wait_ready()
        config = tmp_path / "small.yaml"
        config.write_text(yaml.safe_dump(small_config(tmp_path / "store", corpus)))
        r = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(config)],
            cwd=REPO,
            env=client_env(env, server.api_url),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        api = RealServer(server.url, env, str(home), log=str(tmp_path / "server.log"))
        runs = api.post("/flow_runs/filter").json()
        assert [run["state_type"] for run in runs] == ["COMPLETED"]
        assert task_states(api, runs[0]["id"])["ingest"] == "Completed"
        assert (home / "prefect.db").stat().st_size > 0  # Prefect's default: SQLite in PREFECT_HOME
    finally:
        server.stop()
