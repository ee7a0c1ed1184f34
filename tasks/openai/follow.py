"""The follower: the process that drives one OpenAI fine-tuning job for the openai_train stage.

    python -P tasks/openai/follow.py --spec RUN.json      (standard library, fsspec and openai only)

It uploads the export's files, creates the job -- or reattaches to the one a killed run started --,
polls it, prints its events, and on success writes the job record, its events and result files into
`result_dir`. Every line it prints is a log line; lines that are JSON objects with `"kiln": "openai"`
are events the stage acts on (progress, the outcome).

Why a process and not a thread of the stage: stopping a run reaches processes as signals, and only a
process of its own can act on them while the stage waits. A Prefect worker cancels a flow run by
sending SIGTERM to the flow run's process group, Ctrl-C sends SIGINT to the terminal's foreground
group, a service manager stops a unit with SIGTERM: the follower is in that group (no new session),
and on SIGTERM or SIGINT it cancels the job on OpenAI's side, then exits. A follower that is killed
outright (SIGKILL; it also gets SIGKILL when the stage's process dies, see the stage) leaves the job
running, and the next run of the same fingerprint reattaches to it: through the job id it recorded in
`state_dir` (the unit's scratch directory, which survives a killed attempt), or, if it was killed
between creating the job and recording it, through the job's metadata (`kiln_fingerprint`).

The API key is read by the client from OPENAI_API_KEY and is never written anywhere; every line printed
has it masked, should an error message ever quote it. Requests are retried by the official client
(`max_retries`: 408, 409, 429 honouring Retry-After up to 2 minutes, 5xx, connection errors), except
job creation, which is not idempotent: a create whose answer was lost may still have created the job,
so before trying again the follower looks the job up by its metadata.

Exit codes: 0 succeeded, 2 could not run (the API refused a request, no key), 3 the job failed,
4 cancelled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import time
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_FAILED, EXIT_CANCELLED = 0, 2, 3, 4
ACTIVE = frozenset({"validating_files", "queued", "running", "paused"})
DEAD = frozenset({"failed", "cancelled"})
MAX_RETRY_AFTER_S = 120.0


class StopRequested(BaseException):
    """SIGTERM / SIGINT: the run is being stopped; a BaseException so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class JobFailed(RuntimeError):
    """The job ended `failed` (or a file was refused); the message is OpenAI's."""


class JobCancelled(RuntimeError):
    """The job was cancelled on OpenAI's side, not by this run."""


def redact(text: str) -> str:
    key = os.environ.get("OPENAI_API_KEY") or ""
    return text.replace(key, "[OPENAI_API_KEY]") if len(key) >= 8 else text


def emit(event: str, **fields: Any) -> None:
    print(redact(json.dumps({"kiln": "openai", "event": event, **fields}, default=str)), flush=True)


def say(message: str) -> None:
    print(redact(message), flush=True)


def transient(e: BaseException) -> bool:
    """An error the same request may not hit again: rate limits, timeouts, the server's own errors."""
    import openai

    if isinstance(e, openai.APIConnectionError):  # APITimeoutError included
        return True
    return isinstance(e, openai.APIStatusError) and (e.status_code in (408, 409, 429) or e.status_code >= 500)


def retry_after(e: BaseException) -> float | None:
    response = getattr(e, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name))
        except (TypeError, ValueError):
            continue
        if 0 <= value / scale <= MAX_RETRY_AFTER_S:
            return value / scale
    return None


def describe(e: BaseException) -> str:
    import openai

    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        message = error.get("message") or e.message
        code = f" ({error['code']})" if error.get("code") else ""
        return f"HTTP {e.status_code}{code}: {message}"
    return f"{type(e).__name__}: {e}"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Follower:
    """One job's life cycle: reattach or (upload, create), then follow to the end."""

    def __init__(self, client: Any, spec: dict[str, Any]):
        self.client = client
        self.spec = spec
        self.fingerprint: str = spec["fingerprint"]
        self.job_path = os.path.join(spec["state_dir"], "job.json")
        self.uploads_path = os.path.join(spec["state_dir"], "uploads.json")
        self.job_id: str | None = None
        self.create_sent = False
        self.events: list[dict[str, Any]] = []
        self.event_ids: set[str] = set()

    # -- finding an existing job ---------------------------------------------------------------

    def find_by_metadata(self) -> Any | None:
        """The newest job of this fingerprint that is not dead, from OpenAI's list filtered on metadata."""
        page = self.client.fine_tuning.jobs.list(metadata={"kiln_fingerprint": self.fingerprint}, limit=20)
        mine = [
            j
            for j in page.data
            if (j.metadata or {}).get("kiln_fingerprint") == self.fingerprint and j.status not in DEAD
        ]
        return max(mine, key=lambda j: j.created_at) if mine else None

    def reattach(self) -> Any | None:
        import openai

        recorded = _read_json(self.job_path)
        if recorded and recorded.get("job_id"):
            try:
                job = self.client.fine_tuning.jobs.retrieve(recorded["job_id"])
            except openai.NotFoundError:
                job = None
            if job is not None and job.status not in DEAD:
                self.job_id = job.id  # from here on, a stop cancels it
                emit("reattached", job_id=job.id, status=job.status, found_by="state")
                return job
            if job is not None:
                say(f"the previous job {job.id} of this stage ended {job.status}: starting a new one")
        job = self.find_by_metadata()
        if job is not None:
            emit("reattached", job_id=job.id, status=job.status, found_by="metadata")
            self._record(job)
        return job

    def _record(self, job: Any) -> None:
        self.job_id = job.id
        _write_json(self.job_path, {"job_id": job.id, "fingerprint": self.fingerprint, "created_at": job.created_at})

    # -- starting a job ------------------------------------------------------------------------

    def upload(self) -> dict[str, str]:
        """The files' ids on OpenAI: uploaded now, or by an earlier attempt if OpenAI still has them."""
        import fsspec
        import openai

        uploads = _read_json(self.uploads_path) or {}
        ids: dict[str, str] = {}
        for split, f in self.spec["files"].items():
            earlier = uploads.get(split)
            if earlier and earlier.get("sha256") == f["sha256"]:
                try:
                    obj = self.client.files.retrieve(earlier["id"])
                    if obj.status != "error":
                        ids[split] = obj.id
                        emit("uploaded", split=split, file_id=obj.id, bytes=obj.bytes, reused=True)
                        continue
                except openai.NotFoundError:
                    pass
            with fsspec.open(f["path"], "rb") as fh:
                content = fh.read()
            name = f"kiln-{self.fingerprint[:16]}-{split}.jsonl"
            obj = self.client.files.create(file=(name, content, "application/jsonl"), purpose="fine-tune")
            if obj.status == "error":
                raise JobFailed(f"OpenAI refused the {split} file {obj.id}: {obj.status_details or 'no details'}")
            uploads[split] = {"id": obj.id, "sha256": f["sha256"]}
            _write_json(self.uploads_path, uploads)
            ids[split] = obj.id
            emit("uploaded", split=split, file_id=obj.id, bytes=obj.bytes, reused=False)
        return ids

    def create(self, file_ids: dict[str, str]) -> Any:
        job = self.spec["job"]
        body: dict[str, Any] = {
            "model": job["model"],
            "training_file": file_ids["train"],
            "method": job["method"],
            "metadata": {"kiln_fingerprint": self.fingerprint, "kiln_stage": self.spec.get("stage", "openai_train")},
        }
        if "validation" in file_ids:
            body["validation_file"] = file_ids["validation"]
        for key in ("suffix", "seed"):
            if job.get(key) is not None:
                body[key] = job[key]
        once = self.client.with_options(max_retries=0)
        for attempt in itertools.count():
            try:
                self.create_sent = True
                created = once.fine_tuning.jobs.create(**body)
                break
            except Exception as e:
                if not transient(e):
                    raise
                found = self.find_by_metadata()  # the job may exist although its answer was lost
                if found is not None:
                    say(f"creating the job answered {describe(e)}, but job {found.id} exists: following it")
                    created = found
                    break
                if attempt >= self.spec["max_retries"]:
                    raise
                delay = retry_after(e)
                delay = min(0.5 * 2**attempt, 8.0) if delay is None else delay
                say(f"creating the job: {describe(e)}; retrying in {delay:.1f} s")
                time.sleep(delay)
        self._record(created)
        emit("created", job_id=created.id, status=created.status, model=created.model)
        return created

    # -- following -----------------------------------------------------------------------------

    def new_events(self, job_id: str) -> list[Any]:
        """Events not seen yet, oldest first (the API lists newest first, paging backwards)."""
        fresh = []
        for event in self.client.fine_tuning.jobs.list_events(job_id, limit=100):
            if event.id in self.event_ids:
                break
            fresh.append(event)
        fresh.reverse()
        for event in fresh:
            self.event_ids.add(event.id)
            record = event.model_dump(mode="json")
            self.events.append(record)
            emit(
                "job_event",
                job_id=job_id,
                **{k: record.get(k) for k in ("id", "created_at", "level", "type")},
                message=record.get("message"),
                data=record.get("data"),
            )
        return fresh

    def follow(self, job: Any) -> Any:
        poll = self.spec["poll_interval_s"]
        status = None
        last_ok = time.monotonic()
        while True:
            try:
                job = self.client.fine_tuning.jobs.retrieve(job.id)
                self.new_events(job.id)
                last_ok = time.monotonic()
            except Exception as e:
                if not transient(e) or time.monotonic() - last_ok > self.spec["give_up_after_s"]:
                    raise
                say(f"following job {job.id}: {describe(e)}; the job goes on, trying again")
                time.sleep(poll)
                continue
            if job.status != status:
                status = job.status
                emit("status", job_id=job.id, status=status, estimated_finish=job.estimated_finish)
            if status == "succeeded":
                return job
            if status == "failed":
                error = job.error
                if error is not None:
                    param = f" (param {error.param})" if error.param else ""
                    why = f"{error.code}: {error.message}{param}"
                else:
                    why = "no error given"
                raise JobFailed(f"fine-tuning job {job.id} failed: {why}")
            if status == "cancelled":
                raise JobCancelled("on OpenAI's side, not by this run")
            time.sleep(poll)

    def finish(self, job: Any) -> None:
        out = self.spec["result_dir"]
        os.makedirs(os.path.join(out, "result_files"), exist_ok=True)
        for file_id in job.result_files or []:
            content = self.client.files.content(file_id).read()
            with open(os.path.join(out, "result_files", file_id), "wb") as f:
                f.write(content)
        with open(os.path.join(out, "events.jsonl"), "w") as f:
            for record in self.events:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        _write_json(os.path.join(out, "job.json"), job.model_dump(mode="json"))
        emit(
            "succeeded",
            job_id=job.id,
            fine_tuned_model=job.fine_tuned_model,
            trained_tokens=job.trained_tokens,
            result_files=list(job.result_files or []),
        )

    # -- stopping ------------------------------------------------------------------------------

    def cancel(self, why: str) -> None:
        """The run was asked to stop: cancel the job, if one was started (or maybe started)."""
        import openai

        job_id = self.job_id
        if job_id is None and self.create_sent:
            found = self.find_by_metadata()
            job_id = found.id if found is not None else None
        if job_id is None:
            emit("cancelled", job_id=None, why=why, status="not started")
            return
        try:
            job = self.client.fine_tuning.jobs.cancel(job_id)
        except (openai.BadRequestError, openai.ConflictError):  # already ended: say how
            job = self.client.fine_tuning.jobs.retrieve(job_id)
        emit("cancelled", job_id=job_id, why=why, status=job.status)

    def run(self) -> int:
        try:
            job = self.reattach()
            if job is None:
                job = self.create(self.upload())
            self.job_id = job.id
            job = self.follow(job)
            self.finish(job)
            return EXIT_OK
        except StopRequested as stop:
            self.cancel(f"{stop} received")
            return EXIT_CANCELLED
        except JobFailed as e:
            emit("failed", job_id=self.job_id, message=str(e))
            return EXIT_FAILED
        except JobCancelled as e:
            emit("cancelled", job_id=self.job_id, why=str(e), status="cancelled")
            return EXIT_CANCELLED


def _stop_on(signum: int, frame: Any) -> None:
    # one stop is enough: the second signal of a Ctrl-C pair (terminal + parent) must not cut the cancel short
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise StopRequested(signum)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_on)
    with open(args.spec) as f:
        spec = json.load(f)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_RedactingFormatter("openai client: %(message)s"))
    client_log = logging.getLogger("openai")
    client_log.addHandler(handler)
    client_log.setLevel(logging.INFO)  # the client's "Retrying request in N seconds" lines
    if not os.environ.get("OPENAI_API_KEY"):
        emit("error", message="OPENAI_API_KEY is not set in the environment")
        return EXIT_ERROR
    try:
        import openai

        client = openai.OpenAI(max_retries=spec["max_retries"], timeout=spec["request_timeout_s"])
        return Follower(client, spec).run()
    except StopRequested as stop:  # before the follower existed: nothing was started
        emit("cancelled", job_id=None, why=f"{stop} received", status="not started")
        return EXIT_CANCELLED
    except Exception as e:
        emit("error", message=describe(e))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
