"""Operating Kiln on a real Prefect server: deployments served with `kiln serve`, schedules, runs triggered
with parameters, bad parameters refused, artifacts through the API, the UI, the failure
notification, and retrying a failed run (`prefect deploy` with a worker: test_server_deploy.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, _stop, write_jsonl
from server_helpers import deployment, small_config, task_runs, task_states, wait_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """`kiln serve` of a deployments file (same format as deployments/prefect.yaml) against the server."""
    tmp = tmp_path_factory.mktemp("served")
    corpus = tmp / "corpus"
    write_jsonl(
        corpus / "docs.jsonl",
        [{"id": f"s{i}", "text": f"served document {i}"} for i in range(12)],
        raw_lines=[b"{broken"],
    )
    spec = {
        "deployments": [
            {
                "name": "every-20s",
                "entrypoint": "flows/pipeline.py:pipeline",
                "parameters": {"config": small_config(tmp / "sched-store", corpus)},
                "schedules": [{"interval": 20}],
            },
            {
                "name": "manual",
                "entrypoint": "flows/pipeline.py:pipeline",
                "parameters": {"config": small_config(tmp / "manual-store", corpus)},
            },
            {
                "name": "data",
                "entrypoint": "flows/data.py:data_flow",
                "parameters": {"config": small_config(tmp / "data-store", corpus)},
            },
        ]
    }
    path = tmp / "deployments.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--file", str(path)],
        cwd=REPO,
        env=prefect_server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            names = {d["name"] for d in prefect_server.post("/deployments/filter").json()}
            if {"every-20s", "manual", "data"} <= names:
                break
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            time.sleep(0.5)
        else:
            raise AssertionError("deployments were not registered: " + (tmp / "serve.log").read_text())
        yield {"tmp": tmp, "corpus": corpus, "log": tmp / "serve.log"}
    finally:
        _stop(proc)
        log.close()


def test_deployment_parameters_schema_is_the_pipeline_config(prefect_server, served):
    d = deployment(prefect_server, "manual")
    schema = d["parameter_openapi_schema"]
    assert "config" in schema["properties"] and "config" in schema.get("required", [])
    defs = schema.get("definitions") or schema.get("$defs")
    # a section that is not a kind's own must name its kind: a misspelt section is refused by the server
    extra = defs["PipelineConfig"]["additionalProperties"]
    assert extra["required"] == ["kind"] and "train" in extra["properties"]["kind"]["enum"]
    assert defs["IngestConfig"]["properties"]["paths"]["description"]


def test_scheduled_deployment_gets_runs(prefect_server, served):
    d = deployment(prefect_server, "every-20s")
    assert d["schedules"] and d["schedules"][0]["schedule"]["interval"] == 20
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        runs = prefect_server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [d["id"]]}}}).json()
        if any(r["state_type"] == "COMPLETED" for r in runs):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"no scheduled run completed: {[r['state_type'] for r in runs]}")
    assert os.path.isdir(served["tmp"] / "sched-store" / "ingest")
    # The schedule has been proven; a pipeline run every 20 s for the rest of the module would only take
    # the 2 cores from the tests that follow.
    r = prefect_server.post(f"/deployments/{d['id']}/pause_deployment")
    assert r.status_code in (200, 204), r.text


def test_trigger_with_parameters_runs_the_pipeline(prefect_server, served, tmp_path):
    d = deployment(prefect_server, "manual")
    cfg = small_config(tmp_path / "triggered-store", served["corpus"])
    r = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": cfg}})
    assert r.status_code == 201, r.text
    run = wait_run(prefect_server, r.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    assert task_states(prefect_server, run["id"])["ingest"] == "Completed"
    arts = [n for n in os.listdir(tmp_path / "triggered-store" / "ingest") if not n.startswith(".")]
    assert len(arts) == 1
    manifest = json.loads((tmp_path / "triggered-store" / "ingest" / arts[0] / "_manifest.json").read_text())
    assert manifest["stats"]["rows_out"] == 12 and manifest["stats"]["rejected"] == {"invalid_json": 1}

    # the same parameters again: the stage comes back Cached
    r = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": cfg}})
    run = wait_run(prefect_server, r.json()["id"])
    assert task_states(prefect_server, run["id"]) == {"ingest": "Cached"}

    # the data-flow deployment runs too
    d = deployment(prefect_server, "data")
    r = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {})
    assert wait_run(prefect_server, r.json()["id"])["state_type"] == "COMPLETED"


def test_bad_parameter_refused_naming_the_field(prefect_server, served):
    d = deployment(prefect_server, "manual")
    bad = small_config("/tmp/x", served["corpus"])
    bad["ingest"]["txt_field"] = "body"
    r = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": bad}})
    assert r.status_code == 409 and "txt_field" in r.text
    bad = small_config("/tmp/x", served["corpus"])
    bad["store"]["shard_rows"] = "many"
    r = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": bad}})
    assert r.status_code == 409 and "shard_rows" in r.text
    bad = small_config("/tmp/x", served["corpus"])
    bad["ingset"] = bad.pop("ingest")  # a misspelt section: not a kind, and no `kind:`
    r = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": bad}})
    assert r.status_code == 409 and "kind" in r.text


def test_artifacts_readable_through_the_api(prefect_server, served):
    # The server is shared by the whole test session: other tests' runs publish ingest artifacts too, so
    # look for the served corpus's (12 documents and one broken line) among them.
    def tables_and_reports():
        arts = prefect_server.post(
            "/artifacts/filter", {"artifacts": {"key": {"any_": ["ingest-stats", "ingest-report"]}}}
        ).json()
        tables = [
            a["data"] if isinstance(a["data"], list) else json.loads(a["data"]) for a in arts if a["type"] == "table"
        ]
        reports = [a["data"] for a in arts if a["type"] == "markdown"]
        return tables, reports

    deadline = time.monotonic() + 60
    while True:
        tables, reports = tables_and_reports()
        served_tables = [rows for rows in tables if {"metric": "rows in", "value": 13} in rows]
        if (served_tables and reports) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert served_tables, tables
    assert {"metric": "rows rejected", "value": 1} in served_tables[0]
    assert any("| invalid_json | 1 |" in report for report in reports)


def test_ui_is_served(prefect_server):
    import httpx

    r = httpx.get(prefect_server.url + "/", timeout=30, follow_redirects=True)
    assert r.status_code == 200 and "<html" in r.text.lower() and "prefect" in r.text.lower()


def test_kiln_serve_refuses_without_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "serve"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "needs a Prefect server" in r.stderr


def test_failure_notification_automation_from_the_shipped_template(prefect_server, served, tmp_path):
    """deployments/automations.yaml, with a real webhook block pointing at a loopback receiver: a failed
    run of a Kiln flow produces a notification."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(json.loads(body or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        make_block = (
            "from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
            f"print(B(name='kiln-test', url='http://127.0.0.1:{httpd.server_port}/hook', "
            "json_data={'subject': '{{subject}}', 'body': '{{body}}'}).save('kiln-alerts', overwrite=True))"
        )
        r = subprocess.run([sys.executable, "-c", make_block], env=prefect_server.env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        block_id = r.stdout.strip().splitlines()[-1]
        template = open(os.path.join(REPO, "deployments", "automations.yaml")).read()
        automation = tmp_path / "automations.yaml"
        automation.write_text(template.replace("00000000-0000-0000-0000-000000000000", block_id))
        r = subprocess.run(
            [sys.executable, "-m", "prefect", "automation", "create", "--from-file", str(automation)],
            env=prefect_server.env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr

        d = deployment(prefect_server, "manual")
        cfg = small_config(tmp_path / "store", tmp_path / "no-such-corpus")
        run = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": cfg}}).json()
        run = wait_run(prefect_server, run["id"])
        assert run["state_type"] == "FAILED"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not received:
            time.sleep(0.5)
        assert received, "no notification arrived"
        assert run["name"] in received[0]["subject"] and "Failed" in received[0]["subject"]
        assert "no such file or directory" in received[0]["body"]
    finally:
        httpd.shutdown()


def test_retry_of_a_run_failed_in_a_middle_stage_reruns_only_that_stage_onward(prefect_server, served, tmp_path):
    """ingest -> clean -> langid; clean fails (its store directory is blocked by a file), the block is
    removed, and `prefect flow-run retry` re-executes clean and langid while ingest comes back Cached."""
    corpus = tmp_path / "corpus"
    write_jsonl(
        corpus / "d.jsonl",
        [
            {"id": f"r{i}", "text": " ".join(["This is a fine English sentence about rivers and hills."] * 4) + f" {i}"}
            for i in range(6)
        ],
    )
    root = tmp_path / "store"
    cfg = {
        "name": "retry",
        "store": {"root": str(root)},
        "ingest": {"paths": [str(corpus)]},
        "clean": {"c4": {"enabled": False}},
        "langid": {"languages": ["en"]},
    }
    root.mkdir()
    (root / "clean").write_text("not a directory: the clean stage cannot write here")
    d = deployment(prefect_server, "manual")
    run = prefect_server.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": {"config": cfg}}).json()
    run = wait_run(prefect_server, run["id"])
    assert run["state_type"] == "FAILED"
    first = prefect_server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
    assert {r["name"] for r in first} >= {"ingest", "ingest[0]"} and "langid" not in {r["name"] for r in first}

    (root / "clean").unlink()
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", run["id"]],
        env=prefect_server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        again = prefect_server.get(f"/flow_runs/{run['id']}").json()
        if again["run_count"] >= 2 and again["state_type"] in ("COMPLETED", "FAILED", "CRASHED"):
            break
        time.sleep(0.5)
    assert again["state_type"] == "COMPLETED", again["state"]
    by_name: dict[str, list[str]] = {}
    for t in task_runs(prefect_server, run["id"]):
        by_name.setdefault(t["name"], []).append(t["state"]["name"])
    assert "Cached" in by_name["ingest"]  # finished before the failure: not recomputed
    assert by_name["ingest[0]"] == ["Completed"]  # its unit ran once, in the first attempt only
    assert "Completed" in by_name["clean"] and "Completed" in by_name["langid"]
    assert os.path.isdir(root / "langid")
