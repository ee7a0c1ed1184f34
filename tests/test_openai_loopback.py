"""A loopback HTTP server with OpenAI's files and fine-tuning-jobs endpoints, for the official client.

It speaks the API's wire format (paths under /v1, bearer auth, multipart uploads, JSON objects and
cursor pages, error bodies `{"error": {...}}`) on 127.0.0.1, keeps files and jobs in memory, and moves a
job along one step each time it is retrieved: validating_files (the training file is checked: JSONL
objects of the method's format, at least 10 of them) -> queued -> running (a metrics event per step)
-> succeeded (a fine-tuned model name, a result file). Tests script the rest: a job that fails with an
error, jobs held running until cancelled, and faults answered to the next matching requests (429 with
Retry-After, 5xx, or a 5xx sent after the request took effect: a lost answer).

The tests below check the server against the official client itself, so the stage's tests talk to
something the client accepts.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest


@dataclass
class Fault:
    method: str
    path: str  # a regex matched against the path (without /v1)
    status: int
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    after: bool = False  # let the request take effect, then answer the fault (the answer is lost)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    status: int
    at: float
    body: Any = None


class LoopbackOpenAI:
    """OpenAI's fine-tuning API, in memory, on 127.0.0.1. `base_url` is what OPENAI_BASE_URL takes."""

    def __init__(self, api_key: str, steps: int = 3):
        self.api_key = api_key
        self.steps = steps
        self.hold = False  # jobs stay running (their last step not reached) until cancelled or released
        self.fail_with: dict[str, Any] | None = None  # {"code", "message", "param"}: the next job fails so
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_events: dict[str, list[dict[str, Any]]] = {}
        self.job_steps: dict[str, int] = {}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()  # predicates of wait_for may call calls()
        self._server: ThreadingHTTPServer | None = None
        self._seq = 0

    # -- control -------------------------------------------------------------------------------

    def start(self) -> LoopbackOpenAI:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_POST(self) -> None:
                server._handle(self, "POST")

            def do_DELETE(self) -> None:
                server._handle(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-openai", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def inject(self, method: str, path: str, status: int, times: int = 1, after: bool = False, **headers: str) -> None:
        self.faults.append(
            Fault(method, path, status, times, {k.replace("_", "-"): v for k, v in headers.items()}, after)
        )

    def calls(self, method: str, pattern: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == method and re.fullmatch(pattern, r.path)]

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self):
                    return
            time.sleep(0.02)
        raise AssertionError(f"loopback server: condition not met within {timeout} s; requests: {self.requests[-8:]}")

    def release(self) -> None:
        self.hold = False

    # -- HTTP ----------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = url.path.removeprefix("/v1")
        query = dict(parse_qsl(url.query))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self.lock:
            if h.headers.get("Authorization") != f"Bearer {self.api_key}":
                return self._answer(
                    h, method, path, query, 401, _error("Incorrect API key provided.", "invalid_api_key")
                )
            fault = next(
                (f for f in self.faults if f.times > 0 and f.method == method and re.fullmatch(f.path, path)), None
            )
            if fault is not None:
                fault.times -= 1
                if not fault.after:
                    return self._answer(h, method, path, query, fault.status, _error("injected fault"), fault.headers)
            try:
                status, payload = self._route(method, path, query, body, h.headers.get("Content-Type", ""))
            except _ApiError as e:
                status, payload = e.status, _error(e.message, e.code, e.param)
            if fault is not None:  # it took effect; the answer is lost
                return self._answer(h, method, path, query, fault.status, _error("injected fault"), fault.headers)
            return self._answer(h, method, path, query, status, payload)

    def _answer(
        self,
        h: BaseHTTPRequestHandler,
        method: str,
        path: str,
        query: dict[str, str],
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.requests.append(Request(method, path, query, status, time.monotonic()))
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.send_header("x-request-id", f"req_{uuid.uuid4().hex[:12]}")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(raw)

    def _id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq:04d}{uuid.uuid4().hex[:8]}"

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes, ctype: str) -> tuple[int, Any]:
        if method == "POST" and path == "/files":
            return 200, self._upload(body, ctype)
        m = re.fullmatch(r"/files/([^/]+)(/content)?", path)
        if m and method == "GET":
            f = self.files.get(m.group(1)) or _raise(404, f"No such File object: {m.group(1)}", param="id")
            return 200, (self.contents[f["id"]] if m.group(2) else f)
        if method == "POST" and path == "/fine_tuning/jobs":
            return 200, self._create(json.loads(body))
        if method == "GET" and path == "/fine_tuning/jobs":
            jobs = sorted(self.jobs.values(), key=lambda j: (j["created_at"], j["id"]), reverse=True)
            wanted = {k[len("metadata[") : -1]: v for k, v in query.items() if k.startswith("metadata[")}
            jobs = [j for j in jobs if all((j["metadata"] or {}).get(k) == v for k, v in wanted.items())]
            return 200, _page(jobs, query)
        m = re.fullmatch(r"/fine_tuning/jobs/([^/]+)(/events|/cancel)?", path)
        if m:
            job = self.jobs.get(m.group(1)) or _raise(404, f"No such fine-tuning job: {m.group(1)}", param="id")
            if method == "GET" and m.group(2) is None:
                self._advance(job)
                return 200, job
            if method == "GET" and m.group(2) == "/events":
                return 200, _page(list(reversed(self.job_events[job["id"]])), query)
            if method == "POST" and m.group(2) == "/cancel":
                if job["status"] not in ("validating_files", "queued", "running"):
                    _raise(400, f"Job {job['id']} has already {job['status']}; it cannot be cancelled")
                job.update(status="cancelled", finished_at=_now())
                self._event(job, "info", "Fine-tuning job cancelled")
                return 200, job
        _raise(404, f"Invalid URL ({method} /v1{path})")

    def _upload(self, body: bytes, ctype: str) -> dict[str, Any]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
        )
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"fine-tune":
            _raise(400, "a file and purpose 'fine-tune' are required", param="purpose")
        filename, content = fields["file"]
        if not filename.endswith(".jsonl"):
            _raise(400, "Invalid file format for Fine-Tuning API. Must be .jsonl", param="file")
        file_id = self._id("file")
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": _now(),
            "filename": filename,
            "purpose": "fine-tune",
            "status": "processed",
        }
        self.files[file_id] = obj
        self.contents[file_id] = content
        return obj

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        for key in ("model", "training_file"):
            if not body.get(key):
                _raise(400, f"Missing required parameter: '{key}'.", param=key)
        for key in ("training_file", "validation_file"):
            if body.get(key) and body[key] not in self.files:
                _raise(400, f"invalid {key}: {body[key]}", param=key)
        method = body.get("method") or {"type": "supervised", "supervised": {}}
        if method.get("type") not in ("supervised", "dpo"):
            _raise(400, f"Invalid method type {method.get('type')!r}", param="method.type")
        given = (method.get(method["type"]) or {}).get("hyperparameters") or {}
        resolved = {
            "n_epochs": 3 if given.get("n_epochs", "auto") == "auto" else given["n_epochs"],
            "batch_size": 1 if given.get("batch_size", "auto") == "auto" else given["batch_size"],
            "learning_rate_multiplier": 1.8
            if given.get("learning_rate_multiplier", "auto") == "auto"
            else given["learning_rate_multiplier"],
        }
        if method["type"] == "dpo":
            resolved["beta"] = 0.1 if given.get("beta", "auto") == "auto" else given["beta"]
        job_id = self._id("ftjob")
        job = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": _now(),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": {k: v for k, v in resolved.items() if k != "beta"},
            "model": body["model"],
            "organization_id": "org-kiln-loopback",
            "result_files": [],
            "seed": body.get("seed") if body.get("seed") is not None else 42,
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "estimated_finish": None,
            "integrations": [],
            "metadata": body.get("metadata"),
            "method": {"type": method["type"], method["type"]: {"hyperparameters": resolved}},
            "suffix": body.get("suffix"),
        }
        self.jobs[job_id] = job
        self.job_events[job_id] = []
        self.job_steps[job_id] = 0
        self._event(job, "info", f"Created fine-tuning job: {job_id}")
        self._event(job, "info", f"Validating training file: {body['training_file']}")
        return job

    def _event(self, job: dict[str, Any], level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.job_events[job["id"]].append(
            {
                "id": self._id("ftevent"),
                "object": "fine_tuning.job.event",
                "created_at": _now(),
                "level": level,
                "message": message,
                "data": data,
                "type": "metrics" if data else "message",
            }
        )

    def _check_training_file(self, job: dict[str, Any]) -> str | None:
        lines = [ln for ln in self.contents[job["training_file"]].decode("utf-8").splitlines() if ln.strip()]
        keys = {"supervised": {"messages"}, "dpo": {"input", "preferred_output", "non_preferred_output"}}
        wanted = keys[job["method"]["type"]]
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except ValueError:
                return f"Invalid file format. Line {i + 1} is not valid JSON."
            if not isinstance(record, dict) or set(record) != wanted:
                return f"Invalid file format. Line {i + 1}, key(s) {sorted(record)}: expected {sorted(wanted)}."
        if len(lines) < 10:
            return f"Training file has {len(lines)} example(s), but must have at least 10 examples"
        return None

    def _advance(self, job: dict[str, Any]) -> None:
        """One step further, each time the job is retrieved."""
        status = job["status"]
        if status == "validating_files":
            problem = self._check_training_file(job)
            if problem is None and self.fail_with is not None:
                problem, self.fail_with = self.fail_with, None
            if problem is not None:
                error = problem if isinstance(problem, dict) else {"code": "invalid_training_file", "message": problem}
                error = {"param": "training_file", **error}
                job.update(status="failed", error=error, finished_at=_now())
                self._event(job, "error", error["message"])
                return
            self._event(job, "info", "Files validated, moving job to queued state")
            job["status"] = "queued"
        elif status == "queued":
            job.update(status="running", estimated_finish=_now() + 60)
            self._event(job, "info", "Fine-tuning job started")
        elif status == "running":
            step = self.job_steps[job["id"]]
            if step >= self.steps - 1 and self.hold:
                return
            step += 1
            self.job_steps[job["id"]] = step
            loss = round(2.0 / (1 + step), 4)
            data = {"step": step, "train_loss": loss, "train_mean_token_accuracy": round(0.5 + step / 40, 4)}
            data["total_steps"] = self.steps
            if job["validation_file"]:
                data["valid_loss"] = round(loss * 1.1, 4)
            self._event(job, "info", f"Step {step}/{self.steps}: training loss={loss}", data)
            if step >= self.steps:
                self._succeed(job)

    def _succeed(self, job: dict[str, Any]) -> None:
        rows = ["step,train_loss,train_accuracy"] + [
            f"{e['data']['step']},{e['data']['train_loss']},{e['data']['train_mean_token_accuracy']}"
            for e in self.job_events[job["id"]]
            if e["data"]
        ]
        result_id = self._id("file")
        content = base64.b64encode(("\n".join(rows) + "\n").encode())
        self.files[result_id] = {
            "id": result_id,
            "object": "file",
            "bytes": len(content),
            "created_at": _now(),
            "filename": "step_metrics.csv",
            "purpose": "fine-tune-results",
            "status": "processed",
        }
        self.contents[result_id] = content
        suffix = job.get("suffix") or ""
        tokens = len(self.contents[job["training_file"]]) // 4 * job["hyperparameters"]["n_epochs"]
        job.update(
            status="succeeded",
            fine_tuned_model=f"ft:{job['model']}:kiln-loopback:{suffix}:{job['id'][-8:]}",
            finished_at=_now(),
            trained_tokens=tokens,
            result_files=[result_id],
            estimated_finish=None,
        )
        self._event(job, "info", "The job has successfully completed")


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _raise(status: int, message: str, code: str | None = None, param: str | None = None) -> Any:
    raise _ApiError(status, message, code, param)


def _error(message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """A cursor page: `after` is the id of the last item of the previous page, `limit` its size."""
    if "after" in query:
        ids = [i["id"] for i in items]
        items = items[ids.index(query["after"]) + 1 :] if query["after"] in ids else []
    limit = int(query.get("limit", 20))
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def _now() -> int:
    return int(time.time())


@pytest.fixture
def openai_api(monkeypatch):
    """The loopback server, with OPENAI_BASE_URL pointing at it and a throwaway OPENAI_API_KEY."""
    server = LoopbackOpenAI(api_key=f"sk-kiln-loopback-{uuid.uuid4().hex}").start()
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# the server, as the official client sees it


def chat_lines(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        ).encode()
        + b"\n"
        for i in range(n)
    )


def test_official_client_uploads_creates_follows_and_pages_events(openai_api):
    import openai

    client = openai.OpenAI(max_retries=0)
    f = client.files.create(file=("data.jsonl", chat_lines(12), "application/jsonl"), purpose="fine-tune")
    assert f.status == "processed" and f.bytes == len(chat_lines(12))
    assert client.files.content(f.id).read() == chat_lines(12)
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        metadata={"kiln_fingerprint": "abc"},
    )
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 2
    statuses = [client.fine_tuning.jobs.retrieve(job.id).status for _ in range(5)]
    assert statuses == ["queued", "running", "running", "running", "succeeded"]
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:") and done.result_files
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # pages of 2, newest first
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert len(events) == len(openai_api.job_events[job.id]) and len({e.id for e in events}) == len(events)
    assert [e.data["step"] for e in reversed(events) if e.type == "metrics"] == [1, 2, 3]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"kiln_fingerprint": "abc"})] == [job.id]
    assert list(client.fine_tuning.jobs.list(metadata={"kiln_fingerprint": "other"})) == []


def test_loopback_refuses_a_wrong_key_and_answers_faults(openai_api):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="sk-wrong", max_retries=0).files.retrieve("file-x")
    openai_api.inject("GET", "/files/.*", 429, retry_after="0")
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(max_retries=0).files.retrieve("file-x")
    with pytest.raises(openai.NotFoundError):  # the fault was used up
        openai.OpenAI(max_retries=0).files.retrieve("file-x")


def test_training_file_with_too_few_examples_fails_the_job(openai_api):
    import openai

    client = openai.OpenAI(max_retries=0)
    f = client.files.create(file=("data.jsonl", chat_lines(3), "application/jsonl"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=f.id)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "failed" and "at least 10 examples" in job.error.message
