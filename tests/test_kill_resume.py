"""A stage killed with SIGKILL half way leaves no committed artifact; the rerun finishes the job,
redoing only unfinished units, and ends with exactly the artifact an uninterrupted run makes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tasks.artifacts import ArtifactStore
from tasks.ingest import IngestConfig, IngestStage
from tasks.stage import run_in_store

from conftest import write_jsonl

SCRIPT = """
import sys
from tasks.artifacts import ArtifactStore
from tasks.ingest import IngestConfig, IngestStage
from tasks.stage import run_in_store
art = run_in_store(IngestStage(), IngestConfig(paths=[sys.argv[2]], unit_files=1), [], ArtifactStore(sys.argv[1]))
print(art.path)
"""


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(tmp_path):
    data = tmp_path / "data"
    for i in range(30):
        write_jsonl(
            data / f"part{i:02d}.jsonl", [{"id": f"{i}-{j}", "text": f"file {i} line {j} " * 5} for j in range(6000)]
        )
    cfg = IngestConfig(paths=[str(data)], unit_files=1)
    fp = IngestStage().fingerprint(cfg, [])
    root = str(tmp_path / "killed")
    units_dir = os.path.join(root, "ingest", f".staging-{fp}", "_units")

    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, root, str(data)], cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if os.path.isdir(units_dir) and len([n for n in os.listdir(units_dir) if n.endswith(".json")]) >= 3:
            break
        assert proc.poll() is None, "the stage finished before it could be killed: make the input bigger"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    store = ArtifactStore(root)
    assert not store.is_committed("ingest", fp)
    assert not os.path.exists(os.path.join(root, "ingest", fp))
    finished = sorted(n for n in os.listdir(units_dir) if n.endswith(".json"))
    assert 3 <= len(finished) < 30
    staging_dir = os.path.dirname(units_dir)
    done_shards = {f"part-{int(n[:-5]):05d}-0000.parquet" for n in finished}
    before = {s: os.stat(os.path.join(staging_dir, s)).st_mtime_ns for s in done_shards}

    resumed = run_in_store(IngestStage(), cfg, [], store)
    assert resumed.manifest["units"] == 30
    fresh = run_in_store(IngestStage(), cfg, [], ArtifactStore(str(tmp_path / "fresh")))
    assert resumed.fingerprint == fresh.fingerprint
    assert resumed.manifest["shards"] == fresh.manifest["shards"]
    assert resumed.read_table().equals(fresh.read_table())
    assert resumed.num_rows == 30 * 6000
    for name in resumed.manifest["shards"]:  # byte-identical shards
        with open(os.path.join(resumed.path, name), "rb") as a, open(os.path.join(fresh.path, name), "rb") as b:
            assert a.read() == b.read(), name
    # units finished before the kill were reused, not recomputed: their shards are the same files
    after = {s: os.stat(os.path.join(resumed.path, s)).st_mtime_ns for s in done_shards}
    assert after == before
