"""Load on one Prefect server: many flow runs at once, with the server on PostgreSQL and on SQLite.

    .venv/bin/python bench/bench_server_load.py [--runs 8] [--tasks 50] [--rounds 3] [--db postgres sqlite]

For each database, a fresh server (`flows.server.PrefectServer` on 127.0.0.1: on Kiln's embedded
PostgreSQL, or on Prefect's SQLite default in a fresh PREFECT_HOME), the `load` flow below served as a
deployment from one process (`flow.serve`, as `kiln serve` does, running up to --runs flow runs at once),
then --rounds times: --runs flow runs of it created together, each mapping --tasks tasks, and a wait until
every run has ended and every task run is recorded. Figures per database:

- failed API calls: requests the server answered with an error status, from its own log (Prefect logs
  every 500, and every 503 "retryable" error -- SQLite's lost lock races -- with
  PREFECT_SERVER_LOG_RETRYABLE_ERRORS), plus any of the bench's own calls that failed. Prefect's client
  retries a 503, so a failed call need not fail a run; it is still a call the server did not serve.
- lost runs: flow runs that did not end Completed, and task runs missing from the server's record (each
  flow run must have --tasks Completed task runs: task states reach the server as events, written by a
  server-side service).
- seconds per round, from the burst of creates to the last task run recorded.

A benchmark, not a test: it prints figures (BENCHMARKS.md has them with the machine they came from).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prefect import flow, task  # noqa: E402  (the served flow must be importable from this file)


@task
def square(x: int) -> int:
    return x * x


@flow(name="kiln-load")
def load(tasks: int = 50) -> int:
    return sum(f.result() for f in square.map(range(tasks)))


def serve(limit: int) -> None:
    """The serving process (`--serve`): the deployment, and its flow runs executed as they come."""
    load.serve(name="load", limit=limit, print_starting_message=False)


# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """HTTP calls to the server. Every failed call is counted; `retries` retries a 503 the way Prefect's
    client does (exponential backoff), so that a refused create is a failed call, not a lost run."""

    def __init__(self, api: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=api, timeout=60)
        self.failed = 0  # every failed call of the bench's: error statuses (also in the server's log) and no answer
        self.unanswered = 0  # calls that got no answer at all (a timeout, a reset): not in the server's log
        self.lock = threading.Lock()

    def call(self, method: str, path: str, json: dict | None = None, retries: int = 0) -> object | None:
        import httpx

        for attempt in range(retries + 1):
            status = None
            try:
                r = self.client.request(method, path, json=json)
                if r.status_code < 400:
                    return r.json() if r.content else None
                status = r.status_code
            except httpx.HTTPError:
                with self.lock:
                    self.unanswered += 1
            with self.lock:
                self.failed += 1
            if status not in (None, 429, 502, 503):
                break
            time.sleep(min(2**attempt, 10))
        return None


def one_database(kind: str, runs: int, tasks: int, rounds: int, retries: int, tmp: str) -> dict:
    from flows.server import LocalPostgres, PrefectServer

    home = os.path.join(tmp, kind, "home")
    os.makedirs(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "KILN_SERVER_"))}
    env.update(
        PREFECT_HOME=home,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOG_RETRYABLE_ERRORS="true",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
    )
    local = None
    db_url = None
    if kind == "postgres":
        local = LocalPostgres(os.path.join(tmp, kind, "pgdata"))
        local.start()
        db = local.database("prefect")
        db.create()
        db_url = db.url("asyncpg")
    log_path = os.path.join(tmp, kind, "server.log")
    log = open(log_path, "w")
    server = PrefectServer(db_url, "127.0.0.1", free_port(), env=env, stdout=log)
    served = None
    try:
        t0 = time.perf_counter()
        server.wait_ready()
        started = time.perf_counter() - t0
        client_env = {**env, "PREFECT_API_URL": server.api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        served = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", "--runs", str(runs)],
            cwd=REPO,
            env=client_env,
            stdout=open(os.path.join(tmp, kind, "serve.log"), "w"),
            stderr=subprocess.STDOUT,
        )
        api = Api(server.api_url)
        deployment = None
        deadline = time.monotonic() + 120
        while deployment is None and time.monotonic() < deadline:
            found = api.call("POST", "/deployments/filter", {"deployments": {"name": {"any_": ["load"]}}}) or []
            deployment = found[0]["id"] if found else None
            time.sleep(0.5)
        if deployment is None:
            raise RuntimeError(f"the load deployment was not registered; see {tmp}/{kind}/serve.log")

        results = []
        for i in range(rounds):
            results.append(one_round(api, deployment, runs, tasks, retries))
            r = results[-1]
            print(
                f"  {kind} round {i + 1}: {r['created']}/{runs} runs created, {r['completed']} completed, "
                f"{r['task_runs']}/{runs * tasks} task runs recorded, {r['seconds']:.1f} s",
                flush=True,
            )
    finally:
        if served is not None:
            served.terminate()
            served.wait(timeout=60)
        server.stop()
        log.close()
        if local is not None:
            local.stop()
    with open(log_path, errors="replace") as f:
        text = f.read()
    retryable = text.count("Encountered retryable exception in request")
    internal = text.count("Encountered exception in request")
    return {
        "kind": kind,
        "start_s": started,
        "rounds": results,
        "server_503": retryable,
        "server_500": internal,
        "bench_failed_calls": api.failed,
        "unanswered": api.unanswered,
        "log": log_path,
    }


def one_round(api: Api, deployment: str, runs: int, tasks: int, retries: int) -> dict:
    """`runs` flow runs created at the same moment, then waited for, with all their task runs."""
    barrier = threading.Barrier(runs)
    ids: list[str] = []

    def create() -> None:
        barrier.wait()
        run = api.call("POST", f"/deployments/{deployment}/create_flow_run", {"parameters": {"tasks": tasks}}, retries)
        if run:
            ids.append(run["id"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=create) for _ in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    states: dict[str, str] = {}
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        found = api.call("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}}) or []
        states = {r["id"]: r["state_type"] for r in found}
        ended = [s for s in states.values() if s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        if len(ended) == len(ids):
            break
        time.sleep(1)
    # task states arrive as events and are written by a server-side service: wait for the count to settle
    recorded, last_change, last = 0, time.monotonic(), -1
    while time.monotonic() - last_change < 15 and recorded < runs * tasks:
        done = {"flow_runs": {"id": {"any_": ids}}, "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        recorded = api.call("POST", "/task_runs/count", done) or 0
        if recorded != last:
            last, last_change = recorded, time.monotonic()
        time.sleep(0.5)
    return {
        "created": len(ids),
        "completed": sum(s == "COMPLETED" for s in states.values()),
        "task_runs": recorded,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8, help="Flow runs created together in a round.")
    ap.add_argument("--tasks", type=int, default=50, help="Tasks each flow run maps.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--create-retries",
        type=int,
        default=5,
        help="Retries of a refused create (Prefect's client: 5); 0 is a click in the UI, refused once, lost.",
    )
    ap.add_argument("--db", nargs="+", default=["postgres", "sqlite"], choices=["postgres", "sqlite"])
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.runs)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.rounds} rounds of {args.runs} flow runs x {args.tasks} mapped tasks, "
        f"a refused create retried {args.create_retries} times"
    )
    figures = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-server-") as tmp:
        for kind in args.db:
            figures.append(one_database(kind, args.runs, args.tasks, args.rounds, args.create_retries, tmp))
            f = figures[-1]
            print(
                f"  {kind}: server ready in {f['start_s']:.1f} s; the server logged {f['server_503']} x 503 and "
                f"{f['server_500']} x 500; {f['bench_failed_calls']} of the bench's own calls failed",
                flush=True,
            )
    total_runs = args.rounds * args.runs
    total_tasks = total_runs * args.tasks
    print()
    print("| database | failed API calls (503 / 500 / no answer) | runs completed | task runs recorded | s per round |")
    print("|---|---|---|---|---|")
    for f in figures:
        rs = f["rounds"]
        failed = f["server_503"] + f["server_500"] + f["unanswered"]
        seconds = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        print(
            f"| {f['kind']} | **{failed}** ({f['server_503']} / {f['server_500']} / {f['unanswered']}) "
            f"| {sum(r['completed'] for r in rs)}/{total_runs} | {sum(r['task_runs'] for r in rs)}/{total_tasks} "
            f"| {seconds} |"
        )


if __name__ == "__main__":
    main()
