"""`kiln server` on PostgreSQL: secrets masked, basic auth when exposed, backup and restore with pg_dump /
pg_restore, the data directory kept between runs, another database for shared state (an HPO storage).

The session's `prefect_server` is Kiln's own (embedded PostgreSQL, started by the test run); the servers
started here run on restored copies of its database, one on Kiln's PostgreSQL and one on an "existing"
PostgreSQL reached by URL as a role whose password the server checks (scram-sha-256), so a password that
went missing anywhere on the way (Prefect, pg_restore, the admin queries) would fail the test."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import uuid

import httpx
import pytest

from flows.server import (
    Database,
    LocalPostgres,
    ServerError,
    check_exposure,
    mask,
    redact,
    shared_database_url,
)

from conftest import REPO, RealServer, client_env, server_env, start_kiln_server, stop_kiln_server


def kiln(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


# --------------------------------------------------------------------------------------------------
# URLs and secrets (no server)


def test_mask_hides_every_password_form():
    assert mask("postgresql://kiln:s3cret@db:5432/prefect") == "postgresql://kiln:***@db:5432/prefect"
    assert mask("postgresql+asyncpg://kiln:p@ss@db/prefect") == "postgresql+asyncpg://kiln:***@db/prefect"
    assert mask("postgresql://db/prefect?user=kiln&password=s3cret") == "postgresql://db/prefect?user=kiln&password=***"
    assert mask("postgresql://kiln@db/prefect?host=/run/pg") == "postgresql://kiln@db/prefect?host=/run/pg"
    assert redact("FATAL for p%40ss and p@ss", "p@ss") == "FATAL for *** and ***"


def test_database_url_for_each_driver_keeps_the_password_out_of_what_is_shown():
    db = Database("postgres://kiln:p%40ss@db.example:5433/prefect?sslmode=require")
    assert db.password == "p@ss"
    assert db.url("asyncpg") == "postgresql+asyncpg://kiln:p%40ss@db.example:5433/prefect?sslmode=require"
    assert (
        db.named("optuna").url("psycopg") == "postgresql+psycopg://kiln:p%40ss@db.example:5433/optuna?sslmode=require"
    )
    assert "p@ss" not in db.masked() and "p%40ss" not in db.masked() and "***" in db.masked()
    info = db.conninfo()
    assert "p@ss" not in info and "password" not in info and "sslmode=require" in info and "dbname=prefect" in info
    assert db.env()["PGPASSWORD"] == "p@ss"  # how pg_dump / pg_restore get it: never on their command line
    with pytest.raises(ServerError, match="database name"):
        db.named("optuna; DROP DATABASE prefect")
    with pytest.raises(ServerError, match="not a PostgreSQL URL"):
        Database("sqlite+aiosqlite:////tmp/prefect.db")


def test_a_server_exposed_beyond_loopback_needs_basic_auth(tmp_path):
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None)
    with pytest.raises(ServerError, match="PREFECT_SERVER_API_AUTH_STRING"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "kiln:pw")
    check_exposure("0.0.0.0", None, allow_unauthenticated=True)
    with pytest.raises(ServerError, match="user:password"):
        check_exposure("127.0.0.1", "no-colon")

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_API_AUTH_STRING"}
    r = kiln("server", "start", "--data", str(tmp_path / "srv"), "--host", "0.0.0.0", env=env)
    assert r.returncode == 2 and "PREFECT_SERVER_API_AUTH_STRING" in r.stderr
    assert not (tmp_path / "srv").exists()  # refused before anything started


# --------------------------------------------------------------------------------------------------
# On the session's server and copies of its database


@pytest.fixture(scope="module")
def backup(prefect_server, tmp_path_factory):
    """A marker variable written to the session's server, then `kiln server backup` of it while it runs."""
    marker = {"name": f"kiln_backup_{uuid.uuid4().hex[:8]}", "value": "written before the backup"}
    r = prefect_server.post("/variables/", marker)
    assert r.status_code == 201, r.text
    flows = sorted(f["name"] for f in prefect_server.post("/flows/filter").json())
    path = tmp_path_factory.mktemp("backup") / "prefect.dump"
    r = kiln("server", "backup", str(path), "--data", prefect_server.data, env=prefect_server.env)
    assert r.returncode == 0, r.stderr
    return {"path": path, "marker": marker, "flows": flows}


@pytest.mark.slow
def test_backup_is_private_and_restore_is_refused_while_the_server_runs(prefect_server, backup):
    mode = stat.S_IMODE(os.stat(backup["path"]).st_mode)
    assert mode == 0o600  # it holds the blocks' encrypted secrets and Prefect's key for them
    assert backup["path"].read_bytes()[:5] == b"PGDMP"  # pg_dump's custom format
    r = kiln("server", "restore", str(backup["path"]), "--data", prefect_server.data, env=prefect_server.env)
    assert r.returncode == 2 and "kiln server stop" in r.stderr
    r = kiln("server", "status", "--json", "--data", prefect_server.data, env=prefect_server.env)
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)
    assert st["healthy"] and st["postgres_pid"] and st["api_url"] == prefect_server.api


@pytest.mark.slow
def test_restore_into_kilns_postgres_whose_data_is_kept_between_runs(prefect_server, backup, tmp_path, postgres_dirs):
    """`kiln server restore` into a fresh server directory: Kiln's PostgreSQL is initialised there, started
    for the restore and stopped after it; started again from the same data directory, it holds the
    backed-up state. (Prefect serving a restored database: test_restore_by_url_into_an_existing_postgres.)"""
    data = postgres_dirs("restored")
    r = kiln("server", "restore", str(backup["path"]), "--data", data, env=server_env(str(tmp_path)))
    assert r.returncode == 0, r.stderr
    pg = LocalPostgres(os.path.join(data, "pgdata"))
    assert not pg.running
    pg.start()
    try:
        with pg.database().connect() as conn:
            marker = backup["marker"]
            row = conn.execute("SELECT value FROM variable WHERE name = %s", (marker["name"],)).fetchone()
            assert row and row[0] == marker["value"]
            assert sorted(r[0] for r in conn.execute("SELECT name FROM flow")) == backup["flows"]
    finally:
        pg.stop()
    assert not pg.running


@pytest.fixture(scope="module")
def existing_postgres(postgres_dirs):
    """A PostgreSQL that Kiln did not start, as a team's would be: a role `kiln` whose password the server
    checks (scram-sha-256 on the socket; the embedded server's own superuser stays on trust)."""
    local = LocalPostgres(os.path.join(postgres_dirs("existing"), "pgdata"))
    local.start()
    try:
        password = secrets.token_urlsafe(16)
        with local.database("postgres").connect() as conn:
            conn.execute(f"CREATE ROLE kiln LOGIN CREATEDB PASSWORD '{password}'")
            hba = conn.execute("SHOW hba_file").fetchone()[0]
            with open(hba) as f:
                rules = f.read()
            with open(hba, "w") as f:  # the first matching line wins
                f.write("local all kiln scram-sha-256\n" + rules)
            conn.execute("SELECT pg_reload_conf()")
        sock = local.database("postgres").conninfo().split("host=")[1].split()[0].strip("'")
        yield {"local": local, "password": password, "url": f"postgresql://kiln:{password}@/kiln_prefect?host={sock}"}
    finally:
        local.stop()


@pytest.fixture(scope="module")
def authenticated(prefect_server, backup, existing_postgres, tmp_path_factory):
    """The backup restored into the existing PostgreSQL by URL, and `kiln server start` on it with basic auth."""
    tmp = tmp_path_factory.mktemp("authenticated")
    data, home = str(tmp / "srv"), str(tmp / "home")
    os.makedirs(home)
    auth = f"kiln-admin:{secrets.token_urlsafe(16)}"
    env = {
        **server_env(home),
        "KILN_SERVER_DATABASE_URL": existing_postgres["url"],
        "PREFECT_SERVER_API_AUTH_STRING": auth,
    }
    outputs = {}
    r = kiln("server", "restore", str(backup["path"]), "--data", data, env=env)
    assert r.returncode == 0, r.stderr
    outputs["restore"] = r.stdout + r.stderr
    log = str(tmp / "server.log")
    proc, url = start_kiln_server(data, home, env, log)
    try:
        r = kiln("server", "status", "--data", data, env=env)
        outputs["status"] = r.stdout + r.stderr
        outputs["state"] = (tmp / "srv" / "server.json").read_text()
        server = RealServer(url, {**client_env(env, f"{url}/api"), "PREFECT_API_AUTH_STRING": auth}, home, log, data)
        yield {"server": server, "auth": auth, "env": env, "outputs": outputs, "tmp": tmp}
    finally:
        stop_kiln_server(proc, data, env)


@pytest.mark.slow
def test_restore_by_url_into_an_existing_postgres(authenticated, backup):
    server = authenticated["server"]
    marker = backup["marker"]
    r = server.get(f"/variables/name/{marker['name']}")
    assert r.status_code == 200 and r.json()["value"] == marker["value"]
    assert sorted(f["name"] for f in server.post("/flows/filter").json()) == backup["flows"]


@pytest.mark.slow
def test_basic_auth_refuses_a_client_without_the_credentials(authenticated, backup):
    server = authenticated["server"]
    assert httpx.get(f"{server.api}/health", timeout=10).status_code == 200  # probes stay open
    assert httpx.post(f"{server.api}/flows/filter", json={}, timeout=10).status_code == 401
    user = authenticated["auth"].split(":")[0]
    assert httpx.post(f"{server.api}/flows/filter", json={}, auth=(user, "wrong"), timeout=10).status_code == 401

    # Prefect's own client, as a worker or `kiln run` would use it
    name = backup["marker"]["name"]
    env = {k: v for k, v in server.env.items() if k != "PREFECT_API_AUTH_STRING"}
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "variable", "get", name], env=env, capture_output=True, text=True
    )
    assert r.returncode != 0 and "401" in r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "variable", "get", name], env=server.env, capture_output=True, text=True
    )
    assert r.returncode == 0 and backup["marker"]["value"] in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_credentials_are_never_printed(authenticated, existing_postgres):
    db_password = existing_postgres["password"]
    auth_password = authenticated["auth"].split(":", 1)[1]
    outputs = dict(authenticated["outputs"])
    outputs["server log"] = open(authenticated["server"].log).read()
    assert "kiln:***@" in outputs["status"] and "kiln-admin" in outputs["status"]
    # a wrong password is refused (the server checks it), and the refusal does not echo it
    env = {
        **authenticated["env"],
        "KILN_SERVER_DATABASE_URL": existing_postgres["url"].replace(db_password, "wrong-pw"),
    }
    r = kiln("server", "backup", str(authenticated["tmp"] / "x.dump"), "--data", str(authenticated["tmp"]), env=env)
    assert r.returncode == 2 and "password authentication failed" in r.stderr
    outputs["refusal"] = r.stdout + r.stderr
    dump = authenticated["tmp"] / "by-url.dump"
    r = kiln("server", "backup", str(dump), "--data", str(authenticated["tmp"]), env=authenticated["env"])
    assert r.returncode == 0, r.stderr
    outputs["backup"] = r.stdout + r.stderr
    outputs["backup file"] = dump.read_bytes().decode("latin-1")
    for where, text in outputs.items():
        for secret in (db_password, auth_password, "wrong-pw"):
            assert secret not in text, f"a secret in the {where}"


@pytest.mark.slow
def test_shared_state_gets_a_database_of_its_own_on_the_same_postgres(prefect_server):
    """The URL an HPO study's storage takes (Optuna's RDBStorage: a sync SQLAlchemy engine on it)."""
    import sqlalchemy as sa

    url = shared_database_url("kiln_hpo", directory=prefect_server.data)
    assert url.startswith("postgresql+psycopg://") and "/kiln_hpo?" in url
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS trials (id serial PRIMARY KEY, value float)"))
            conn.execute(sa.text("INSERT INTO trials (value) VALUES (0.5)"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM trials")).scalar() >= 1
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "kiln_hpo"
    finally:
        engine.dispose()
    r = kiln("server", "url", "--database", "kiln_hpo", "--data", prefect_server.data, env=prefect_server.env)
    assert r.returncode == 0 and r.stdout.strip() == url  # Kiln's PostgreSQL: no password to mask
    with pytest.raises(ServerError, match="own database"):
        shared_database_url("prefect", directory=prefect_server.data)
