"""The embedded Prefect API for `kiln run` when no server is configured.

Prefect's own ephemeral mode imports its whole server package into the client process (~4 s here) and
only then starts the same server in a subprocess (~8 s), one after the other. Kiln starts that
subprocess first -- the same uvicorn app Prefect's ephemeral mode runs, on 127.0.0.1, writing to the
same PREFECT_HOME database -- and points PREFECT_API_URL at it, so the server boots while the client
imports. A fully cached `kiln run` drops from ~16 s to ~10 s on a 2-core machine. Runs land in the same
database either way, so `prefect server start` shows them afterwards.

Set KILN_EMBEDDED_SERVER=0 to fall back to Prefect's ephemeral mode.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = tempfile.NamedTemporaryFile(prefix="kiln-prefect-server-", suffix=".log", delete=False)
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        }
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the embedded Prefect server exited ({self.proc.returncode}); log: {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the embedded Prefect server did not answer within {timeout:.0f} s; log: {self.log.name}")

    def stop(self) -> None:
        _drain_prefect_workers()  # flush logs and events to the server while it still listens
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def configured_api_url() -> str | None:
    """The Prefect API the user configured (environment or active profile), if any."""
    return os.environ.get("PREFECT_API_URL") or _profile_api_url()


def start_if_needed() -> EmbeddedServer | None:
    """Start the embedded server unless a Prefect API is configured (env or profile) or it is disabled."""
    if os.environ.get("KILN_EMBEDDED_SERVER", "1") == "0" or configured_api_url():
        return None
    server = EmbeddedServer()
    os.environ["PREFECT_API_URL"] = server.url
    return server


def _profile_api_url() -> str | None:
    """A PREFECT_API_URL set with `prefect config set` lives in the profiles file, not the environment."""
    import tomllib

    home = os.environ.get("PREFECT_HOME", os.path.join(os.path.expanduser("~"), ".prefect"))
    path = os.environ.get("PREFECT_PROFILES_PATH", os.path.join(home, "profiles.toml"))
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None
