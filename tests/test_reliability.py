"""Refresh that repairs, kills that leave no orphans, a staging directory no two live runs share, and
failures that name the section and field (the reliability defects found by trying Kiln as a user)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from flows.config import PipelineConfig
from tasks.artifacts import MANIFEST, Artifact, ArtifactStore, UnitBusy
from tasks.artifacts.store import recover_trash, replace_directory
from tasks.ingest import IngestConfig, IngestStage
from tasks.stage import StageInputError, run_in_store

from conftest import REPO, write_jsonl


def _docs(n: int) -> list[dict]:
    """n documents of real prose (the standard library's docstrings shipped in examples/, repeated)."""
    with open(os.path.join(REPO, "examples", "data", "stdlib_docstrings.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    return [
        {"id": f"d{i}", "text": texts[i % len(texts)] if i < len(texts) else texts[i % len(texts)][: 200 + i]}
        for i in range(n)
    ]


def _files(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            if n.endswith(".parquet"):
                with open(os.path.join(root, n), "rb") as f:
                    out[os.path.relpath(os.path.join(root, n), path)] = f.read()
    return out


@pytest.mark.usefixtures("prefect_harness")
def test_refresh_replaces_a_damaged_artifact_with_a_fresh_one(tmp_path):
    from flows.pipeline import pipeline

    corpus = write_jsonl(tmp_path / "c.jsonl", _docs(200))
    cfg = PipelineConfig.model_validate(
        {
            "store": {"root": str(tmp_path / "store")},
            "ingest": {"paths": [corpus]},
            "clean": {"c4": {"enabled": False}, "gopher_quality": {"min_words": 20}},
        }
    )
    fresh = pipeline(config=cfg)["clean"]
    art = Artifact.open(fresh["path"])
    good = _files(art.path)
    assert 10 < art.num_rows < 200 and art.stats.rows_rejected
    shard = art.shards()[0]
    pq.write_table(pq.read_table(shard).slice(0, 10), shard)  # the damage
    assert pq.read_metadata(shard).num_rows == 10

    refs = pipeline(config=cfg, refresh=["clean"])
    assert refs["clean"]["cached"] is False and refs["clean"]["path"] == art.path
    assert _files(art.path) == good  # byte for byte the fresh run's shards and rejects
    repaired = Artifact.open(art.path)
    assert repaired.read_table().num_rows == repaired.num_rows == art.num_rows
    leftovers = [n for n in os.listdir(os.path.dirname(art.path)) if n.startswith(".")]
    assert leftovers == []
    refs = pipeline(config=cfg, from_stage="ingest")  # --from recomputes and replaces too
    assert all(not r["cached"] for r in refs.values()) and _files(art.path) == good


def test_replacing_a_directory_is_atomic_and_a_half_done_fallback_is_recovered(tmp_path):
    final, staging = str(tmp_path / "art"), str(tmp_path / ".staging-art")
    for d, body in ((final, "old"), (staging, "new")):
        os.makedirs(d)
        with open(os.path.join(d, MANIFEST), "w") as f:
            f.write(body)
    replace_directory(staging, final)
    assert open(os.path.join(final, MANIFEST)).read() == "new" and sorted(os.listdir(tmp_path)) == ["art"]
    # the fallback path (no renameat2) killed between its two renames: the old artifact is under a trash
    # name and nothing is at the final path; the store puts it back before anyone sees it missing
    os.rename(final, final + ".trash-1234abcd")
    store = ArtifactStore(str(tmp_path.parent))
    assert recover_trash(final) and open(os.path.join(final, MANIFEST)).read() == "new"
    assert store.is_committed(tmp_path.name, "art")


def test_a_unit_locked_by_a_live_run_is_not_written_and_a_dead_owner_frees_it(tmp_path, monkeypatch):
    import tasks.artifacts.store as store_module

    monkeypatch.setattr(store_module, "UNIT_LOCK_WAIT_SECONDS", 1.0)
    corpus = write_jsonl(tmp_path / "c.jsonl", _docs(20))
    store = ArtifactStore(str(tmp_path / "s"))
    stage, cfg = IngestStage(), IngestConfig(paths=[corpus])
    staging = store.staging("ingest", stage.fingerprint(cfg, []))
    os.makedirs(os.path.join(staging.dir, "_locks"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, json, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'here', 'since': 'now'}).encode())\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n"
            ),
            os.path.join(staging.dir, "_locks", "00000.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UnitBusy, match=f"being written by another live run \\(pid {holder.pid} on here"):
            run_in_store(stage, cfg, [], store)
        with pytest.raises(UnitBusy):
            staging.recompute_all()  # a refresh does not throw away what a live run is writing
    finally:
        holder.kill()
        holder.wait()
    art = run_in_store(stage, cfg, [], store)  # the owner is gone: the lock is free
    assert art.num_rows == 20


@pytest.mark.usefixtures("prefect_harness")
def test_a_failing_stage_names_its_section_and_field(tmp_path):
    from flows.pipeline import pipeline

    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    cfg = PipelineConfig.model_validate(
        {
            "store": {"root": str(tmp_path / "store")},
            "ingest": {"paths": [write_jsonl(tmp_path / "c.jsonl", _docs(5))]},
            "tokenizer": {"path": str(broken), "retries": 0},
        }
    )
    with pytest.raises(StageInputError, match="^tokenizer.path: cannot load a tokenizer from"):
        pipeline(config=cfg)


@pytest.mark.usefixtures("prefect_harness")
def test_tokenize_with_a_tokenizer_directory_runs_in_a_pipeline(tmp_path):
    from flows.pipeline import pipeline
    from flows.plan import plan_pipeline

    from train_fixtures import make_tokenizer

    tok = make_tokenizer(str(tmp_path / "tok"))
    cfg = PipelineConfig.model_validate(
        {
            "store": {"root": str(tmp_path / "store")},
            "ingest": {"paths": [write_jsonl(tmp_path / "c.jsonl", _docs(30))]},
            "tokenize": {"tokenizer": tok.path},
            "pack": {"seq_len": 32},
        }
    )
    assert [(p.name, p.inputs) for p in plan_pipeline(cfg)] == [
        ("ingest", []),
        ("tokenize", ["ingest"]),
        ("pack", ["tokenize"]),
    ]
    refs = pipeline(config=cfg)
    assert Artifact.open(refs["tokenize"]["path"]).num_rows == 30 and refs["pack"]["rows"] > 0


TRAIN_YAML = """
name: kill-test
store: {{root: {root}}}
ingest: {{paths: [{data}]}}
tokenizer: {{vocab_size: 384}}
tokenize: {{}}
pack: {{seq_len: 64, validation_fraction: 0.0}}
train:
  model: {{init: {{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                  num_attention_heads: 4, num_key_value_heads: 4}}}}
  max_steps: 200
  micro_batch_size: 4
  save_every: 20
  log_every: 1000         # nothing written to the (killed) launcher's pipe between checkpoints
  eval_every: 1000
  keep_checkpoints: 50
  optim: {{lr: 0.002, warmup_steps: 5}}
"""


def _ours(spec: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if spec in cmd:
            found.append(p)
    return found


@pytest.mark.slow
def test_sigkill_of_kiln_run_leaves_no_launcher_or_rank_and_the_rerun_resumes(tmp_path):
    """`kiln run` under setsid, SIGKILL to its process group once step 40 is checkpointed: the launcher and
    both ranks die with it, no later checkpoint appears, and the rerun resumes to the same losses as an
    uninterrupted run."""
    from tasks.train.stage import TrainStage

    root = tmp_path / "store"
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(
        TRAIN_YAML.format(root=root, data=os.path.join(REPO, "examples", "data", "stdlib_docstrings.jsonl"))
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg_path)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    staging = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = list((root / "train").glob(".staging-*/checkpoints/step40")) if (root / "train").exists() else []
        if found and (found[0].parent / "latest").exists() and (found[0].parent / "latest").read_text() == "step40":
            staging = found[0].parent.parent
            break
        assert proc.poll() is None, "kiln run ended before the checkpoint"
        time.sleep(0.02)
    assert staging is not None, "never saw the step-40 checkpoint"
    spec = str(staging / "_scratch")
    assert _ours(spec), "no launcher or rank seen"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _ours(spec) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _ours(spec), [p.info["cmdline"] for p in _ours(spec)]
    time.sleep(2)
    # nothing went on training into the staging directory after the kill
    assert (staging / "checkpoints" / "latest").read_text() == "step40"
    assert not (staging / "checkpoints" / "step60").exists()

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train_dir = next(d for d in (root / "train").iterdir() if not d.name.startswith("."))
    resumed = json.load(open(train_dir / "metrics.json"))["history"]
    # the uninterrupted run: the same stage on the same committed pack and tokenizer
    from flows.config import load_config
    from flows.plan import plan_pipeline

    planned = {p.name: p for p in plan_pipeline(load_config(str(cfg_path)))}
    p = planned["train"]
    inputs = [Artifact.open(planned[i].path, s) for i, s in zip(p.inputs, p.slots)]
    reference = run_in_store(TrainStage(), p.cfg, inputs, ArtifactStore(str(tmp_path / "reference")))
    ref = {
        h["step"]: h["loss"]
        for h in json.load(open(os.path.join(reference.path, "metrics.json")))["history"]
        if h["kind"] == "train"
    }
    got = {h["step"]: h["loss"] for h in resumed if h["kind"] == "train"}
    assert sorted(got) == sorted(ref) == [200]  # the final step's log
    assert got[200] == pytest.approx(ref[200], rel=1e-5, abs=1e-6)
    done = json.load(open(train_dir / "metrics.json"))
    assert done["steps"] == 200


@pytest.mark.slow
def test_a_flow_run_cancelled_through_the_api_stops_its_in_process_training(tmp_path, prefect_server):
    """`kiln run` executes its flow run in its own process, so Prefect's cancellation (the UI's Cancel: the
    run's state set to CANCELLING) sends it no signal: the unit's watcher sees the state and stops the
    launcher and ranks. The run ends, nothing is committed, the checkpoints stay, and a rerun resumes."""
    root = tmp_path / "store"
    cfg_path = tmp_path / "cancel.yaml"
    cfg_path.write_text(
        TRAIN_YAML.format(root=root, data=os.path.join(REPO, "examples", "data", "stdlib_docstrings.jsonl"))
    )
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=prefect_server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        latest = None
        deadline = time.monotonic() + 300
        while latest is None:
            found = list((root / "train").glob(".staging-*/checkpoints/latest")) if (root / "train").exists() else []
            latest = found[0] if found else None
            assert proc.poll() is None and time.monotonic() < deadline, "kiln run ended before the first checkpoint"
            time.sleep(0.1)
        staging = latest.parent.parent
        spec = str(staging / "_scratch")
        assert _ours(spec), "no launcher or rank seen"
        runs = prefect_server.post(
            "/flow_runs/filter",
            {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}, "flows": {"name": {"any_": ["kiln-pipeline"]}}},
        ).json()
        [run] = runs
        r = prefect_server.post(f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        assert r.status_code in (200, 201), r.text
        cancelled_at = time.monotonic()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - cancelled_at < 60
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while _ours(spec) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _ours(spec), "a launcher or rank outlived the cancelled run"
    assert not [d for d in (root / "train").iterdir() if not d.name.startswith(".")]  # nothing committed
    kept = (staging / "checkpoints" / "latest").read_text()
    assert kept.startswith("step") and int(kept[4:]) < 200
    units = prefect_server.post(
        "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "task_runs": {"name": {"like_": "train["}}}
    ).json()
    assert [u["state_type"] for u in units] == ["CANCELLED"], units

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed" in again.stdout + again.stderr
