"""openai_train, the `openai` training backend: the official client against the loopback server.

The whole life cycle: upload, create (supervised and DPO), poll, events into the log, success with
the job record and metrics in the artifact, failure with OpenAI's message, 429s and 5xx retried, a
lost answer to the create not making a second job, a killed run reattaching, a stopped run cancelling
the job -- as a Prefect process worker stops a flow run (SIGTERM to its process group) and as Ctrl-C
does (SIGINT) -- and the key never written anywhere."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import test_openai_loopback
import yaml
from test_openai_export import sft_records, write_table

from tasks.artifacts import Artifact, ArtifactStore
from tasks.ingest import SftIngestConfig, SftIngestStage
from tasks.openai import OpenAIExportConfig, OpenAIExportStage, OpenAITrainConfig, OpenAITrainStage
from tasks.openai.train import OpenAIBackendError, OpenAIJobCancelled, OpenAIJobFailed
from tasks.prefs.schema import PAIRS_SCHEMA, messages_json
from tasks.stage import StageInputError, run_in_store

from conftest import REPO, write_jsonl

openai_api = test_openai_loopback.openai_api  # the loopback server's fixture

MODEL = "gpt-4.1-mini-2025-04-14"


def cfg(**kw) -> OpenAITrainConfig:
    return OpenAITrainConfig(model=MODEL, poll_interval_s=0.02, max_retries=3, **kw)


def chat_export(tmp_path, store: ArtifactStore, validation: float = 0.0) -> Artifact:
    write_jsonl(tmp_path / "sft.jsonl", sft_records(16))
    docs = run_in_store(SftIngestStage(), SftIngestConfig(paths=[str(tmp_path / "sft.jsonl")]), [], store)
    return run_in_store(
        OpenAIExportStage(), OpenAIExportConfig(validation_fraction=validation, split_seed=1), [docs], store
    )


def pairs_export(store: ArtifactStore) -> Artifact:
    rows = [
        {
            "id": f"p{i}",
            "prompt": messages_json([{"role": "user", "content": f"Explain {i} briefly."}]),
            "chosen": f"{i} is a number.",
            "rejected": f"I won't ({i}).",
            "chosen_score": 1.0,
            "rejected_score": 0.0,
            "source": "test",
            "meta": "{}",
        }
        for i in range(12)
    ]
    return run_in_store(
        OpenAIExportStage(), OpenAIExportConfig(), [write_table(store, "pairs", PAIRS_SCHEMA, rows)], store
    )


def all_text_under(path: str) -> str:
    out = []
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out.append(f.read().decode("utf-8", "replace"))
    return "\n".join(out)


def test_supervised_job_runs_to_the_end_and_the_artifact_holds_it(tmp_path, openai_api, caplog):
    caplog.set_level(logging.DEBUG)  # everything, the client's own loggers included: the key is in none of it
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store, validation=0.2)
    config = cfg(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5, suffix="kiln", seed=7)
    art = run_in_store(OpenAITrainStage(), config, [export], store)

    # what reached OpenAI: both files byte for byte, then one job with the settings and our fingerprint
    uploads = openai_api.calls("POST", "/files")
    assert len(uploads) == 2
    sent = sorted(openai_api.contents[f["id"]] for f in openai_api.files.values() if f["purpose"] == "fine-tune")
    local = sorted(open(os.path.join(export.path, n), "rb").read() for n in ("train.jsonl", "validation.jsonl"))
    assert sent == local
    [job] = openai_api.jobs.values()
    assert job["model"] == MODEL and job["suffix"] == "kiln" and job["seed"] == 7
    assert job["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}},
    }
    assert job["validation_file"] and job["metadata"] == {
        "kiln_fingerprint": art.fingerprint,
        "kiln_stage": "openai_train",
    }

    [row] = art.read_table().to_pylist()
    assert row["job_id"] == job["id"] and row["status"] == "succeeded" and row["method"] == "supervised"
    assert row["fine_tuned_model"] == job["fine_tuned_model"] and row["fine_tuned_model"].startswith(f"ft:{MODEL}:")
    assert row["trained_tokens"] == job["trained_tokens"] > 0
    info = export.manifest["openai"]
    assert row["estimated_billed_tokens"] == 2 * info["billed_tokens_per_epoch"]
    assert art.manifest["openai_job"] == {
        "id": job["id"],
        "status": "succeeded",
        "model": MODEL,
        "fine_tuned_model": job["fine_tuned_model"],
    }
    with open(os.path.join(art.path, "job.json")) as f:
        assert json.load(f)["id"] == job["id"]
    metrics = art.read_table(table="metrics").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["train_loss"] > metrics[-1]["train_loss"] and metrics[-1]["valid_loss"] is not None
    assert art.table_rows("events") == len(openai_api.job_events[job["id"]])
    [result] = job["result_files"]
    assert open(os.path.join(art.path, "result_files", result), "rb").read() == openai_api.contents[result]
    report = open(os.path.join(art.path, "report.md")).read()
    assert job["fine_tuned_model"] in report and "train_loss" in report
    assert art.stats.extra["fine_tuned_model"] == job["fine_tuned_model"]

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"created fine-tuning job {job['id']}" in logged
    assert f"openai job {job['id']}: Step 2/3: training loss" in logged
    assert f"openai job {job['id']} succeeded: {job['fine_tuned_model']}" in logged
    assert openai_api.api_key not in logged
    assert openai_api.api_key not in all_text_under(str(tmp_path / "store"))

    n = len(openai_api.requests)
    again = run_in_store(OpenAITrainStage(), config, [export], store)  # committed: nothing is asked again
    assert again.path == art.path and len(openai_api.requests) == n


def test_dpo_job_on_a_preference_export(tmp_path, openai_api):
    store = ArtifactStore(str(tmp_path / "store"))
    art = run_in_store(OpenAITrainStage(), cfg(beta=0.25), [pairs_export(store)], store)
    [job] = openai_api.jobs.values()
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.25
    assert art.read_table().to_pylist()[0]["method"] == "dpo"
    line = json.loads(openai_api.contents[job["training_file"]].splitlines()[0])
    assert set(line) == {"input", "preferred_output", "non_preferred_output"}


def test_failed_job_fails_the_stage_with_openais_message_then_a_rerun_starts_a_new_job(tmp_path, openai_api):
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.fail_with = {"code": "invalid_training_file", "message": "The job failed due to an invalid file."}
    with pytest.raises(OpenAIJobFailed, match=r"failed: invalid_training_file: The job failed due to an invalid file"):
        run_in_store(OpenAITrainStage(), cfg(), [export], store)
    fp = OpenAITrainStage().fingerprint(cfg(), [export.fingerprint])
    assert not store.is_committed("openai_train", fp)

    art = run_in_store(OpenAITrainStage(), cfg(), [export], store)
    assert len(openai_api.calls("POST", "/fine_tuning/jobs")) == 2  # the failed job is not followed again
    assert len(openai_api.calls("POST", "/files")) == 1  # the file uploaded by the failed attempt is reused
    assert art.read_table().to_pylist()[0]["status"] == "succeeded"


def test_rate_limits_and_server_errors_are_retried(tmp_path, openai_api, caplog):
    caplog.set_level(logging.INFO, logger="kiln.openai")
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.inject("POST", "/files", 429, retry_after="1")  # the client waits as it is told
    openai_api.inject("GET", "/fine_tuning/jobs/[^/]+", 503)  # the client's own backoff
    openai_api.inject("GET", "/fine_tuning/jobs/[^/]+", 502, retry_after_ms="50")
    openai_api.inject("GET", "/fine_tuning/jobs/[^/]+/events", 500, retry_after_ms="50")
    openai_api.inject("POST", "/fine_tuning/jobs", 429, retry_after_ms="300")
    art = run_in_store(OpenAITrainStage(), cfg(), [export], store)
    assert art.read_table().to_pylist()[0]["status"] == "succeeded"

    refused, accepted = openai_api.calls("POST", "/files")
    assert refused.status == 429 and accepted.status == 200 and accepted.at - refused.at >= 0.95
    statuses = [r.status for r in openai_api.calls("POST", "/fine_tuning/jobs")]
    assert statuses == [429, 200]
    first_look, lookup = openai_api.calls("GET", "/fine_tuning/jobs")  # is the job there before trying again?
    create_429, create_ok = openai_api.calls("POST", "/fine_tuning/jobs")
    assert first_look.at < create_429.at < lookup.at < create_ok.at and create_ok.at - create_429.at >= 0.29
    assert [r.status for r in openai_api.calls("GET", "/fine_tuning/jobs/[^/]+")][:3] == [503, 502, 200]
    assert [r.status for r in openai_api.calls("GET", "/fine_tuning/jobs/[^/]+/events")][:2] == [500, 200]
    assert len(openai_api.jobs) == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Retrying request in" in logged and "creating the job: HTTP 429" in logged


def test_a_lost_answer_to_the_create_does_not_make_a_second_job(tmp_path, openai_api, caplog):
    caplog.set_level(logging.INFO, logger="kiln.openai")
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.inject("POST", "/fine_tuning/jobs", 502, after=True)  # created, but the answer is an error
    art = run_in_store(OpenAITrainStage(), cfg(), [export], store)
    assert len(openai_api.jobs) == 1 and len(openai_api.calls("POST", "/fine_tuning/jobs")) == 1
    assert art.read_table().to_pylist()[0]["job_id"] == next(iter(openai_api.jobs))
    assert "but job ftjob-" in "\n".join(r.getMessage() for r in caplog.records)


def test_a_missing_key_is_refused_before_anything_is_sent(tmp_path, openai_api, monkeypatch):
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(StageInputError, match="OPENAI_API_KEY: not set") as e:
        run_in_store(OpenAITrainStage(), cfg(), [export], store)
    assert e.value.field == "OPENAI_API_KEY"
    assert openai_api.requests == []


def test_stop_cancels_the_job_of_a_unit_running_in_this_process(tmp_path, openai_api):
    """What an orchestrator calls when its cancellation does not reach the follower as a signal."""
    import threading

    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.hold = True
    raised: list[BaseException] = []

    def run() -> None:
        try:
            run_in_store(OpenAITrainStage(), cfg(), [export], store)
        except BaseException as e:
            raised.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    openai_api.wait_for(running_job)
    stage = OpenAITrainStage()
    directory = store.staging(stage.name, stage.fingerprint(cfg(), [export.fingerprint])).dir
    assert not stage.stop(str(tmp_path / "another-unit"), "cancelled")  # only the unit writing there
    assert stage.stop(directory, "cancelled")
    worker.join(timeout=60)
    [job] = openai_api.jobs.values()
    assert job["status"] == "cancelled"
    [error] = raised
    assert isinstance(error, OpenAIJobCancelled) and "SIGTERM received" in str(error)
    assert not stage.stop(directory, "cancelled")


def test_following_gives_up_on_lasting_errors_and_the_job_goes_on(tmp_path, openai_api):
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.inject("GET", "/fine_tuning/jobs/[^/]+", 503, times=10_000)
    impatient = cfg(give_up_after_s=0.3).model_copy(update={"max_retries": 0})
    with pytest.raises(OpenAIBackendError, match="HTTP 503"):
        run_in_store(OpenAITrainStage(), impatient, [export], store)
    [job] = openai_api.jobs.values()
    assert not openai_api.calls("POST", "/fine_tuning/jobs/.*/cancel")  # not ours to stop: the job goes on

    openai_api.faults.clear()
    art = run_in_store(OpenAITrainStage(), impatient, [export], store)  # the same fingerprint: follows it
    assert art.read_table().to_pylist()[0]["job_id"] == job["id"] and len(openai_api.jobs) == 1


RUN_STAGE = """
import sys
from tasks.artifacts import Artifact, ArtifactStore
from tasks.openai import OpenAITrainConfig, OpenAITrainStage
from tasks.stage import run_in_store
cfg = OpenAITrainConfig.model_validate_json(sys.argv[3])
art = run_in_store(OpenAITrainStage(), cfg, [Artifact.open(sys.argv[2])], ArtifactStore(sys.argv[1]))
print("committed", art.path)
"""


def start_stage(store_root: str, export: Artifact, config: OpenAITrainConfig) -> subprocess.Popen:
    """The stage in a process of its own, in a session of its own (as a Prefect worker starts a flow run)."""
    return subprocess.Popen(
        [sys.executable, "-c", RUN_STAGE, store_root, export.path, config.model_dump_json()],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def running_job(server) -> bool:
    return any(j["status"] == "running" for j in server.jobs.values())


def wait_until_training_is_followed(server) -> None:
    """A held job at its last step but one, and the follower has read its events since."""
    server.wait_for(lambda s: any(n >= s.steps - 1 for n in s.job_steps.values()), timeout=150)
    seen = len(server.calls("GET", "/fine_tuning/jobs/[^/]+/events"))
    server.wait_for(lambda s: len(s.calls("GET", "/fine_tuning/jobs/[^/]+/events")) >= seen + 2)


def test_a_killed_run_leaves_the_job_running_and_the_rerun_follows_it(tmp_path, openai_api, caplog):
    caplog.set_level(logging.INFO, logger="kiln.openai")
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.hold = True
    proc = start_stage(store.root, export, cfg())
    openai_api.wait_for(running_job)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its follower, as a crash or an OOM kill would
    proc.wait()
    [job] = openai_api.jobs.values()
    time.sleep(0.3)
    quiet = len(openai_api.requests)
    time.sleep(0.3)
    assert len(openai_api.requests) == quiet, "the killed run's follower is still polling"
    assert job["status"] == "running" and not openai_api.calls("POST", "/fine_tuning/jobs/.*/cancel")

    openai_api.release()
    art = run_in_store(OpenAITrainStage(), cfg(), [export], store)
    assert len(openai_api.calls("POST", "/fine_tuning/jobs")) == 1 and len(openai_api.calls("POST", "/files")) == 1
    assert art.read_table().to_pylist()[0]["job_id"] == job["id"]
    assert art.read_table(table="metrics").num_rows == 3  # the steps before the kill are in it too
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"following fine-tuning job {job['id']} started by an earlier attempt (running; found by state)" in logged


def test_ctrl_c_cancels_the_job_and_the_rerun_starts_a_new_one(tmp_path, openai_api):
    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.hold = True
    proc = start_stage(store.root, export, cfg())
    openai_api.wait_for(running_job)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
    out, _ = proc.communicate(timeout=60)
    # the process stops with whichever comes up first: its own KeyboardInterrupt, or the follower's
    # report that the job was cancelled (the follower got the same SIGINT)
    assert proc.returncode != 0 and ("KeyboardInterrupt" in out or "OpenAIJobCancelled" in out), out[-3000:]
    [job] = openai_api.jobs.values()
    assert job["status"] == "cancelled" and len(openai_api.calls("POST", "/fine_tuning/jobs/.*/cancel")) == 1
    assert f"openai job {job['id']} cancelled: SIGINT received (status cancelled)" in out

    openai_api.release()
    art = run_in_store(OpenAITrainStage(), cfg(), [export], store)
    assert len(openai_api.jobs) == 2 and art.read_table().to_pylist()[0]["job_id"] != job["id"]


def test_a_job_cancelled_elsewhere_fails_the_stage_as_cancelled(tmp_path, openai_api):
    import openai

    store = ArtifactStore(str(tmp_path / "store"))
    export = chat_export(tmp_path, store)
    openai_api.hold = True
    proc = start_stage(store.root, export, cfg())
    openai_api.wait_for(running_job)
    [job] = openai_api.jobs.values()
    openai.OpenAI().fine_tuning.jobs.cancel(job["id"])  # someone cancels it in OpenAI's dashboard
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"OpenAIJobCancelled: fine-tuning job {job['id']} was cancelled (on OpenAI's side, not by this run" in out


def flow_runs(prefect_server, name: str) -> list[dict]:
    return prefect_server.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}}).json()


@pytest.mark.slow
def test_a_flow_run_stopped_by_its_worker_cancels_the_job(tmp_path, openai_api, prefect_server):
    """`kiln run` reporting to a real Prefect server, stopped the way a Prefect process worker stops a
    cancelled flow run: SIGTERM to the flow run's process group. The job is cancelled on OpenAI's side,
    the flow run ends without committing anything, and its log in Prefect holds the job's events; the
    next run starts a new job and commits it."""
    write_jsonl(tmp_path / "sft.jsonl", sft_records(16))
    config = {
        "name": "openai-cancel",
        "store": {"root": str(tmp_path / "store")},
        "sft_ingest": {"paths": [str(tmp_path / "sft.jsonl")]},
        "openai_export": {"model": MODEL},
        "openai_train": {"model": MODEL, "poll_interval_s": 0.05},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**prefect_server.env, "OPENAI_API_KEY": openai_api.api_key, "OPENAI_BASE_URL": openai_api.base_url}
    kiln = [sys.executable, "-m", "flows.cli", "run", str(path)]
    openai_api.hold = True
    proc = subprocess.Popen(
        kiln, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        wait_until_training_is_followed(openai_api)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[0][-4000:]) from None
    # the run's log lines reach the API in batches every few seconds: the lines this test reads must be
    # there before the stop, which gives a process no time to flush them
    deadline = time.monotonic() + 60
    while True:
        runs = [
            r
            for r in prefect_server.post("/flow_runs/filter", {}).json()
            if r["parameters"]["config"]["name"] == "openai-cancel"
        ]
        logs = prefect_server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}}).json()
        text = "\n".join(entry["message"] for entry in logs)
        if "created fine-tuning job" in text and "Step 1/3: training loss" in text:
            break
        assert time.monotonic() < deadline, "the job's log lines never reached Prefect"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    [job] = openai_api.jobs.values()
    assert job["status"] == "cancelled", out[-4000:]
    assert proc.returncode != 0
    assert not os.path.isdir(os.path.join(str(tmp_path / "store"), "openai_train", "")) or not [
        n for n in os.listdir(os.path.join(str(tmp_path / "store"), "openai_train")) if not n.startswith(".")
    ]
    [run] = [
        r
        for r in prefect_server.post("/flow_runs/filter", {}).json()
        if r["parameters"]["config"]["name"] == "openai-cancel"
    ]
    assert run["state_type"] in ("CRASHED", "CANCELLED", "FAILED"), run["state_type"]
    logs = prefect_server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    messages = "\n".join(entry["message"] for entry in logs)
    assert f"created fine-tuning job {job['id']}" in messages
    assert f"openai job {job['id']}: Step 1/3: training loss" in messages
    # the last lines of a process being stopped may not reach the API before it exits; its console has them
    assert f"openai job {job['id']} cancelled: SIGTERM received (status cancelled)" in out

    openai_api.release()
    done = subprocess.run(kiln, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert len(openai_api.jobs) == 2 and "openai_train" in done.stdout
    finished_job = next(j for j in openai_api.jobs.values() if j["status"] == "succeeded")
    # kiln run's summary names the job and the model it made
    assert f"job {finished_job['id']}: model {finished_job['fine_tuned_model']}" in done.stdout, done.stdout[-3000:]
    assert openai_api.api_key not in done.stdout + done.stderr + out + messages
    # the finished run in Prefect: the job's progress filled, its report among the run's artifacts
    [second] = [
        r
        for r in prefect_server.post("/flow_runs/filter", {}).json()
        if r["parameters"]["config"]["name"] == "openai-cancel" and r["id"] != run["id"]
    ]
    assert second["state_type"] == "COMPLETED"
    arts = prefect_server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [second["id"]]}}}).json()
    by_key = {a["key"]: a for a in arts}
    assert float(by_key["openai-train-unit-progress"]["data"]) == 100.0
    finished = next(j for j in openai_api.jobs.values() if j["status"] == "succeeded")
    assert f"OpenAI fine-tuning job `{finished['id']}`" in by_key["openai-train-report"]["data"]
    assert finished["fine_tuned_model"] in by_key["openai-train-report"]["data"]
