"""openai_train: fine-tune a model through OpenAI's API on an openai_export artifact (the `openai` backend).

The stage checks what it can before anything leaves the machine (the export's problems, the method
against the export's format, the model against the limits the export was validated for, the API key),
then starts the follower (tasks/openai/follow.py) -- a process that uploads the files, creates the job
or reattaches to the one a killed run started, and follows it -- and streams its output into the
`kiln.openai` logger, which the Prefect layer forwards to the task run's log: the job's own events
(validation, each training step's metrics) appear there as they happen, and its steps fill the unit's
progress artifact.

The artifact: one row describing the job (`job_id`, `status`, `base_model`, `fine_tuned_model`, ...),
`job.json` (the job record as OpenAI returned it), the tables `metrics` (one row per training step:
train / validation loss and token accuracy) and `events`, OpenAI's result files under `result_files/`,
and `report.md`. A failed job fails the stage with OpenAI's message; a cancelled one (the run was
stopped) fails it as cancelled. A rerun after a failure or a cancellation starts a new job; a rerun
after a kill follows the job that is still running. `run_number` asks for a new job on purpose.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from tasks.artifacts import Artifact, ArtifactWriter, pick
from tasks.artifacts.paths import join
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.train.launch import die_with_parent

log = logging.getLogger("kiln.openai")

EXIT_OK, EXIT_ERROR, EXIT_FAILED, EXIT_CANCELLED = 0, 2, 3, 4
FOLLOWER_STOP_GRACE_S = 25.0  # a Prefect runner waits 30 s after its SIGTERM before it kills

JOB_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("fine_tuned_model", pa.string()),
        pa.field("method", pa.string(), nullable=False),
        pa.field("training_file", pa.string()),
        pa.field("validation_file", pa.string()),
        pa.field("trained_tokens", pa.int64()),
        pa.field("estimated_billed_tokens", pa.int64()),
        pa.field("created_at", pa.int64()),
        pa.field("finished_at", pa.int64()),
        pa.field("seed", pa.int64()),
    ]
)
EVENTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("created_at", pa.int64()),
        pa.field("level", pa.string()),
        pa.field("type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("data", pa.string()),  # JSON
    ]
)


class OpenAIBackendError(RuntimeError):
    """The job could not be run (the API refused a request, the key is missing); says why."""


class OpenAIJobFailed(RuntimeError):
    """OpenAI ran the job and it failed; the message is OpenAI's."""


class OpenAIJobCancelled(RuntimeError):
    """The job was cancelled: this run was stopped, or someone cancelled it on OpenAI's side."""


Epochs = Annotated[int, Field(ge=1, le=50)]
BatchSize = Annotated[int, Field(ge=1, le=256)]
Multiplier = Annotated[float, Field(gt=0, le=10)]
Beta = Annotated[float, Field(gt=0, le=2)]


class OpenAITrainConfig(StageConfig):
    """The fine-tuning job: base model, method and hyperparameters; how the job is followed."""

    # how often to ask and how patiently, not what is trained: a change must not start a second (paid) job
    execution_fields = StageConfig.execution_fields | {
        "poll_interval_s",
        "max_retries",
        "request_timeout_s",
        "give_up_after_s",
    }

    retries: int = Field(
        0,
        ge=0,
        le=20,
        description="Prefect task retries. Default 0: a failed job is usually the data's fault, and every retry is "
        "a new paid job (a dropped connection does not fail the stage: see give_up_after_s).",
    )
    model: str = Field(
        ...,
        min_length=1,
        description="The model to fine-tune, e.g. gpt-4.1-mini-2025-04-14 (or a fine-tuned `ft:...` one to continue).",
    )
    method: Literal["auto", "supervised", "dpo"] = Field(
        "auto", description="'supervised' on a chat export, 'dpo' on a preference export; 'auto': from the export."
    )
    n_epochs: Epochs | Literal["auto"] = Field("auto", description="Passes over the training file; 'auto': OpenAI's.")
    batch_size: BatchSize | Literal["auto"] = Field("auto", description="Examples per update; 'auto': OpenAI's.")
    learning_rate_multiplier: Multiplier | Literal["auto"] = Field(
        "auto", description="Scales OpenAI's base learning rate; 'auto': OpenAI's."
    )
    beta: Beta | Literal["auto"] | None = Field(
        None, description="DPO only: how strongly the policy is held to the reference model; None: OpenAI's default."
    )
    suffix: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Added to the fine-tuned model's name (ft:<model>:<org>:<suffix>:...).",
    )
    seed: int | None = Field(None, description="The job's seed (reproducibility); None: OpenAI picks one.")
    run_number: int = Field(
        0,
        ge=0,
        description="Bump to train again on the same data and settings (a new job and artifact); with the same "
        "value a rerun follows the job already started.",
    )
    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between looks at the job (status, new events).")
    max_retries: int = Field(
        5,
        ge=0,
        le=20,
        description="Retries of one request (429 honouring Retry-After, 408/409/5xx, connection errors).",
    )
    request_timeout_s: float = Field(120.0, gt=0, description="Timeout of one request.")
    give_up_after_s: float = Field(
        900.0,
        gt=0,
        description="How long following the job may keep failing (network, 5xx) before the stage fails; the job "
        "goes on, and a rerun follows it.",
    )

    @model_validator(mode="after")
    def _beta_is_for_dpo(self) -> OpenAITrainConfig:
        if self.beta is not None and self.method == "supervised":
            raise ValueError("beta: a DPO setting; method is supervised")
        return self


class OpenAITrainStage(Stage):
    name = "openai_train"
    version = 1
    Config = OpenAITrainConfig

    def bindings(self, cfg: OpenAITrainConfig) -> dict[str, str | None]:
        return {"data": "openai_export"}

    stoppable = True

    def stop(self, directory: str, reason: str) -> bool:
        """Stop the unit writing `directory`: its follower cancels the job (see stop_followers)."""
        return stop_followers(directory) > 0

    @staticmethod
    def _export(inputs: list[Artifact], cfg: OpenAITrainConfig) -> tuple[Artifact, dict[str, Any], str]:
        from tasks.openai.tokens import model_family, resolve_limits

        data = pick(inputs, "data", ("openai_export",))
        info = (data.manifest.get("openai") or {}) if data is not None else {}
        if data is None or not info.get("files"):
            where = f"{data.path} is a {data.stage} artifact" if data is not None else "no input"
            raise StageInputError("inputs", f"openai_train reads an openai_export artifact ({where})")
        if info.get("problems"):
            raise StageInputError("inputs", f"{data.path} cannot be trained on: " + "; ".join(info["problems"]))
        method = cfg.method if cfg.method != "auto" else ("dpo" if info["format"] == "preference" else "supervised")
        wanted = "preference" if method == "dpo" else "chat"
        if info["format"] != wanted:
            raise StageInputError(
                "method", f"{method} trains on a {wanted} export; {data.path} is a {info['format']} export"
            )
        if cfg.beta is not None and method != "dpo":
            raise StageInputError("beta", f"a DPO setting; the method is {method}")
        if model_family(cfg.model) is not None:
            encoding, limit = resolve_limits(cfg.model, "auto", None)
            if encoding != info["encoding"] or limit < info["max_tokens_per_example"]:
                raise StageInputError(
                    "model",
                    f"{cfg.model} ({encoding}, {limit:,} tokens per example) is not what {data.path} was checked "
                    f"for ({info['model']}: {info['encoding']}, {info['max_tokens_per_example']:,}); "
                    "set the export's model to it",
                )
        return data, info, method

    def plan(self, inputs: list[Artifact], cfg: OpenAITrainConfig) -> list[dict[str, Any]]:
        self._export(inputs, cfg)
        _require_key()
        return [{"job": 0}]

    def process(
        self, unit: dict[str, Any], inputs: list[Artifact], cfg: OpenAITrainConfig, out: ArtifactWriter
    ) -> None:
        data, info, method = self._export(inputs, cfg)
        _require_key()
        fp = self.fingerprint(cfg, [a.fingerprint for a in inputs])
        state_dir = out.scratch or os.path.join(
            os.environ.get("KILN_OPENAI_STATE", os.path.expanduser("~/.cache/kiln/openai")), fp
        )
        result_dir = os.path.join(state_dir, "result")
        os.makedirs(result_dir, exist_ok=True)
        for name in os.listdir(result_dir):  # what an earlier attempt left is not this attempt's result
            _remove(os.path.join(result_dir, name))
        hyper: dict[str, Any] = {
            "n_epochs": cfg.n_epochs,
            "batch_size": cfg.batch_size,
            "learning_rate_multiplier": cfg.learning_rate_multiplier,
        }
        if method == "dpo" and cfg.beta is not None:
            hyper["beta"] = cfg.beta
        spec = {
            "stage": self.name,
            "fingerprint": fp,
            "files": {
                split: {"path": _child(data.path, f["file"]), "sha256": f["sha256"], "bytes": f["bytes"]}
                for split, f in info["files"].items()
            },
            "job": {
                "model": cfg.model,
                "method": {"type": method, method: {"hyperparameters": hyper}},
                "suffix": cfg.suffix,
                "seed": cfg.seed,
            },
            "state_dir": state_dir,
            "result_dir": result_dir,
            "poll_interval_s": cfg.poll_interval_s,
            "max_retries": cfg.max_retries,
            "request_timeout_s": cfg.request_timeout_s,
            "give_up_after_s": cfg.give_up_after_s,
        }
        spec_path = os.path.join(state_dir, "follow.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=2)
        epochs = cfg.n_epochs if cfg.n_epochs != "auto" else info["estimated_epochs_auto"]
        estimate = epochs * info["billed_tokens_per_epoch"]
        log.info(
            "openai_train: %s fine-tuning of %s on %s training example(s), about %s billed tokens (%s epoch(s))",
            method,
            cfg.model,
            info["files"]["train"]["examples"],
            f"{estimate:,}",
            epochs,
        )
        outcome = follow(spec_path, out)
        self._commit_job(out, cfg, method, result_dir, estimate, outcome)

    def _commit_job(
        self,
        out: ArtifactWriter,
        cfg: OpenAITrainConfig,
        method: str,
        result_dir: str,
        estimate: int,
        outcome: dict[str, Any],
    ) -> None:
        with open(os.path.join(result_dir, "job.json")) as f:
            job = json.load(f)
        events = []
        with open(os.path.join(result_dir, "events.jsonl")) as f:
            events = [json.loads(line) for line in f if line.strip()]
        fs = out.fs
        with fs.open(join(fs, out.directory, "job.json"), "w") as f:
            json.dump(job, f, indent=2)
        files_dir = os.path.join(result_dir, "result_files")
        for name in sorted(os.listdir(files_dir)) if os.path.isdir(files_dir) else ():
            fs.makedirs(join(fs, out.directory, "result_files"), exist_ok=True)
            fs.put_file(os.path.join(files_dir, name), join(fs, out.directory, "result_files", name))
        row = {
            "job_id": job["id"],
            "status": job["status"],
            "base_model": job.get("model") or cfg.model,
            "fine_tuned_model": job.get("fine_tuned_model"),
            "method": method,
            "training_file": job.get("training_file"),
            "validation_file": job.get("validation_file"),
            "trained_tokens": job.get("trained_tokens"),
            "estimated_billed_tokens": estimate,
            "created_at": job.get("created_at"),
            "finished_at": job.get("finished_at"),
            "seed": job.get("seed"),
        }
        out.write(pa.RecordBatch.from_pylist([row], schema=JOB_SCHEMA))
        metrics = metrics_table(events)
        if metrics.num_rows:
            out.table("metrics").write(metrics)
        if events:
            out.table("events").write(
                pa.RecordBatch.from_pylist(
                    [
                        {
                            **{k: e.get(k) for k in ("id", "created_at", "level", "type", "message")},
                            "data": json.dumps(e.get("data")) if e.get("data") is not None else None,
                        }
                        for e in events
                    ],
                    schema=EVENTS_SCHEMA,
                )
            )
        summary = {
            "job_id": job["id"],
            "fine_tuned_model": job.get("fine_tuned_model"),
            "trained_tokens": job.get("trained_tokens") or 0,
            "estimated_billed_tokens": estimate,
        }
        last = metrics.slice(metrics.num_rows - 1).to_pylist()[0] if metrics.num_rows else {}
        summary.update({f"final_{k}": v for k, v in last.items() if k != "step" and v is not None})
        out.stats.extra.update(summary)
        with fs.open(join(fs, out.directory, "report.md"), "w") as f:
            f.write(report_markdown(row, metrics, outcome))

    def finalize(self, inputs: list[Artifact], cfg: OpenAITrainConfig, directory: str, fs: Any) -> dict[str, Any]:
        """The fine-tuned model's name and the job, where later stages and people look first."""
        with fs.open(join(fs, directory, "job.json"), "r") as f:
            job = json.load(f)
        return {
            "openai_job": {
                "id": job["id"],
                "status": job["status"],
                "model": job.get("model"),
                "fine_tuned_model": job.get("fine_tuned_model"),
            }
        }


def _require_key() -> None:
    if not os.environ.get("OPENAI_API_KEY"):
        raise StageInputError(
            "OPENAI_API_KEY",
            "not set: export it in the environment of the process that runs the pipeline (it is read from "
            "there only, never stored); OPENAI_BASE_URL points at a proxy or another endpoint",
        )


def _child(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def _remove(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _redact(text: str) -> str:
    key = os.environ.get("OPENAI_API_KEY") or ""
    return text.replace(key, "[OPENAI_API_KEY]") if len(key) >= 8 else text


def _follower_preexec() -> None:  # in the child, between fork and exec: no imports here (locks held at fork)
    # Same process group as the run (no setsid): a group's SIGTERM or SIGINT -- a Prefect worker
    # cancelling the flow run, Ctrl-C -- reaches the follower, which cancels the job. Killed with its
    # parent it cancels nothing: the job goes on for the rerun.
    die_with_parent(signal.SIGKILL)


_LIVE: dict[subprocess.Popen, str] = {}  # this process's followers and the unit directory each writes
_LIVE_LOCK = threading.Lock()


def stop_followers(directory: str | None = None) -> int:
    """Ask the follower writing `directory` (or every follower this process started) to stop: each cancels
    its job, and its stage then fails as cancelled. For an orchestrator whose cancellation does not reach
    the follower as a signal (a flow run cancelled in Prefect's UI while `kiln run` runs it in-process:
    the Prefect layer calls the stage's stop); returns how many were asked."""
    with _LIVE_LOCK:
        live = [p for p, d in _LIVE.items() if p.poll() is None and directory in (None, d)]
    for p in live:
        p.send_signal(signal.SIGTERM)
    return len(live)


def follow(spec_path: str, out: ArtifactWriter) -> dict[str, Any]:
    """Run the follower to the end, its output into the log and its steps into the unit's progress;
    the outcome event, or the matching exception."""
    # the file itself, not `-m tasks.openai.follow`: it needs nothing of Kiln, so the package's imports (pyarrow,
    # the stages) are not paid for; -P keeps its folder off sys.path
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "follow.py")
    proc = subprocess.Popen(
        [sys.executable, "-P", script, "--spec", spec_path],
        cwd=os.path.dirname(spec_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=_follower_preexec,
        pass_fds=tuple(fd for fd in (out.lock_fd,) if fd is not None),
    )
    with _LIVE_LOCK:
        _LIVE[proc] = out.directory
    try:
        return _stream(proc, out)
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(proc, None)


def _stream(proc: subprocess.Popen, out: ArtifactWriter) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    tail: list[str] = []

    def handle(line: str) -> None:
        nonlocal tail
        line = _redact(line.rstrip("\n"))
        event = _event(line)
        if event is None:
            log.info("%s", line)
            tail = (tail + [line])[-10:]
            return
        _log_event(event, out)
        if event["event"] in ("succeeded", "failed", "cancelled", "error"):
            outcome.update(event)

    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            handle(line)
        code = proc.wait()
    except BaseException:
        # this process is being stopped (Ctrl-C on `kiln stage`): the follower cancels the job on SIGTERM,
        # and what it says about that still goes to the log
        for line in _stop(proc).splitlines():
            handle(line)
        raise
    if code == EXIT_OK and outcome.get("event") == "succeeded":
        return outcome
    if code == EXIT_FAILED:
        raise OpenAIJobFailed(outcome.get("message") or "the fine-tuning job failed")
    if code == EXIT_CANCELLED:
        raise OpenAIJobCancelled(
            f"fine-tuning job {outcome.get('job_id') or '(none started)'} was cancelled ({outcome.get('why')}; "
            f"job status {outcome.get('status')})"
        )
    if outcome.get("event") == "error":
        raise OpenAIBackendError(f"OpenAI fine-tuning: {outcome['message']}")
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    raise OpenAIBackendError("the OpenAI job follower " + how + "; its last lines:\n" + "\n".join(tail))


def _stop(proc: subprocess.Popen) -> str:
    """SIGTERM the follower (it cancels the job), wait for it within the grace a Prefect runner gives,
    and return what it printed meanwhile."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=FOLLOWER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest or ""


def _event(line: str) -> dict[str, Any] | None:
    if not line.startswith('{"kiln": "openai"'):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


_LEVELS = {"info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}


def _log_event(event: dict[str, Any], out: ArtifactWriter) -> None:
    kind = event["event"]
    job = event.get("job_id")
    if kind == "job_event":
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        log.log(_LEVELS.get(event.get("level") or "info", logging.INFO), "openai job %s: %s", job, event.get("message"))
        if event.get("type") == "metrics" and data.get("step") and data.get("total_steps"):
            loss = data.get("train_loss")
            note = f"step {data['step']}/{data['total_steps']}" + (
                f", train loss {loss:.4f}" if loss is not None else ""
            )
            out.progress(data["step"] / data["total_steps"], note)
    elif kind == "status":
        log.info("openai job %s: %s", job, event.get("status"))
        if event.get("status") == "succeeded":
            out.progress(1.0, "succeeded")
    elif kind == "uploaded":
        log.info(
            "openai: %s file %s (%s bytes)%s",
            event.get("split"),
            event.get("file_id"),
            event.get("bytes"),
            ", uploaded by an earlier attempt" if event.get("reused") else " uploaded",
        )
    elif kind == "created":
        log.info("openai: created fine-tuning job %s on %s (%s)", job, event.get("model"), event.get("status"))
    elif kind == "reattached":
        log.info(
            "openai: following fine-tuning job %s started by an earlier attempt (%s; found by %s)",
            job,
            event.get("status"),
            event.get("found_by"),
        )
    elif kind == "succeeded":
        log.info("openai job %s succeeded: %s", job, event.get("fine_tuned_model"))
    elif kind in ("failed", "error"):
        log.error("openai: %s", event.get("message"))
    elif kind == "cancelled":
        log.warning("openai job %s cancelled: %s (status %s)", job, event.get("why"), event.get("status"))


def metrics_table(events: list[dict[str, Any]]) -> pa.Table:
    """One row per training step from the job's metrics events: the step, then every number reported."""
    by_step: dict[int, dict[str, Any]] = {}
    for e in events:
        data = e.get("data")
        if e.get("type") != "metrics" or not isinstance(data, dict) or not isinstance(data.get("step"), int):
            continue
        by_step.setdefault(data["step"], {}).update(
            {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
    names = sorted({k for row in by_step.values() for k in row} - {"step", "total_steps"})
    steps = sorted(by_step)
    columns = {"step": pa.array(steps, pa.int64())}
    for name in names:
        columns[name] = pa.array([by_step[s].get(name) for s in steps], pa.float64())
    return pa.table(columns)


def report_markdown(row: dict[str, Any], metrics: pa.Table, outcome: dict[str, Any]) -> str:
    lines = [
        f"# OpenAI fine-tuning job `{row['job_id']}`",
        "",
        f"**{row['status']}**: {row['method']} fine-tuning of `{row['base_model']}` -> `{row['fine_tuned_model']}`",
        "",
        f"Trained tokens: {row['trained_tokens'] or 0:,} "
        f"(estimated before the job: {row['estimated_billed_tokens']:,}).",
        "",
    ]
    if metrics.num_rows:
        cols = [c for c in metrics.column_names if c != "step"]
        first, last = metrics.slice(0, 1).to_pylist()[0], metrics.slice(metrics.num_rows - 1).to_pylist()[0]
        lines += ["| metric | first step | last step |", "|---|---:|---:|"]
        for c in cols:
            a, b = first.get(c), last.get(c)
            lines.append(f"| {c} | {'' if a is None else f'{a:.4f}'} | {'' if b is None else f'{b:.4f}'} |")
        lines += ["", f"{metrics.num_rows} steps (step {first['step']} to {last['step']}).", ""]
    if row["fine_tuned_model"]:
        lines += [
            "Use it:",
            "",
            "```python",
            "from openai import OpenAI",
            f'OpenAI().chat.completions.create(model="{row["fine_tuned_model"]}", messages=[...])',
            "```",
            "",
        ]
    return "\n".join(lines)
