"""Helpers for the tests that talk to the real Prefect server (the `prefect_server` fixture)."""

from __future__ import annotations

import time


def small_config(root, corpus) -> dict:
    return {"name": "served", "store": {"root": str(root)}, "ingest": {"paths": [str(corpus)]}}


def deployment(server, name: str) -> dict:
    for d in server.post("/deployments/filter").json():
        if d["name"] == name:
            return d
    raise KeyError(name)


def wait_run(server, run_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = server.get(f"/flow_runs/{run_id}").json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not finish: {run['state_type']}")


def task_runs(server, run_id: str, timeout: float = 60) -> list[dict]:
    """The task runs of a finished flow run, once each is recorded in a final state. Task states reach the
    server as events that a server-side service writes, so the record can trail the flow run's own state
    (a task still `Running` a moment after its flow run is `Completed`)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}}).json()
        if all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        if time.monotonic() > deadline:
            return runs  # the caller's assertion shows what is unfinished
        time.sleep(0.25)


def task_states(server, run_id: str) -> dict[str, str]:
    return {r["name"]: r["state"]["name"] for r in task_runs(server, run_id)}
