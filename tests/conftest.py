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


class RealServer:
    def __init__(self, url: str, env: dict[str, str], home: str):
        self.url = url  # http://127.0.0.1:PORT
        self.api = f"{url}/api"
        self.env = env  # environment for subprocesses that talk to this server
        self.home = home

    # Prefect's SQLite backend answers 503 when a write transaction loses a lock race (it happens on a
    # loaded 2-core machine while served runs write task states); its own client retries those, and so
    # do these helpers, with backoff, for up to ~2 minutes.
    RETRY_STATUS = (429, 502, 503)

    def _request(self, method: str, path: str, **kw):
        import time

        import httpx

        delay = 0.5
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.request(method, f"{self.api}{path}", timeout=30, **kw)
                if r.status_code not in self.RETRY_STATUS or time.monotonic() > deadline:
                    return r
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 8.0)

    def get(self, path: str, **kw):
        return self._request("GET", path, **kw)

    def post(self, path: str, json=None):
        return self._request("POST", path, json=json or {})

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(os.path.join(self.home, "server.log"), errors="replace") as f:
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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME and a free port, stopped by PID."""
    import subprocess
    import sys

    home = str(tmp_path_factory.mktemp("prefect-server-home"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=home,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_API_LOG_RETRYABLE_ERRORS="true",  # lock races show in server.log, attached to failed tests
    )
    log = os.path.join(home, "server.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc, log)
        client_env = {
            **env,
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_CLIENT_MAX_RETRIES": "7",
        }
        yield RealServer(f"http://127.0.0.1:{port}", client_env, home)
    finally:
        _stop(proc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the real Prefect server gets the server log's tail in its report."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("prefect_server")
    if report.failed and server is not None and hasattr(server, "log_tail"):
        report.sections.append(("prefect server log (tail)", server.log_tail()))
