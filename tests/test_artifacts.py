"""The artifact store: fingerprints, atomic commit, unit resume, streaming reads, fsspec URLs."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from tasks.artifacts import (
    MANIFEST,
    Artifact,
    ArtifactError,
    ArtifactStore,
    StageStats,
    canonical_json,
    fingerprint,
)
from tasks.documents import DOCUMENT_SCHEMA


def docs(n: int, start: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "id": [f"d{i}" for i in range(start, start + n)],
            "text": [f"text {i}" for i in range(start, start + n)],
            "source": ["t"] * n,
            "url": [None] * n,
            "lang": [None] * n,
            "meta": ["{}"] * n,
        },
        schema=DOCUMENT_SCHEMA,
    )


def test_fingerprint_ignores_key_order_and_is_sensitive_to_everything_else():
    a = fingerprint("s", 1, {"x": 1, "y": {"b": 2, "a": [1, 2]}}, ["in1"])
    b = fingerprint("s", 1, {"y": {"a": [1, 2], "b": 2}, "x": 1}, ["in1"])
    assert a == b
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    variants = [
        fingerprint("t", 1, {"x": 1, "y": {"b": 2, "a": [1, 2]}}, ["in1"]),  # stage
        fingerprint("s", 2, {"x": 1, "y": {"b": 2, "a": [1, 2]}}, ["in1"]),  # version
        fingerprint("s", 1, {"x": 2, "y": {"b": 2, "a": [1, 2]}}, ["in1"]),  # config value
        fingerprint("s", 1, {"x": 1, "y": {"b": 2, "a": [2, 1]}}, ["in1"]),  # list order
        fingerprint("s", 1, {"x": 1, "y": {"b": 2, "a": [1, 2]}}, ["in2"]),  # inputs
        fingerprint("s", 1, {"x": 1, "y": {"b": 2, "a": [1, 2]}}, ["in1"], sources=[1]),  # sources
    ]
    assert len({a, *variants}) == len(variants) + 1


def _write_units(store: ArtifactStore, fp: str, units: list[int]) -> None:
    staging = store.staging("demo", fp)
    for u in units:
        w = staging.begin_unit(u)
        w.write(docs(10, start=u * 10))
        w.stats.rows_in = 11
        w.reject("too_short", "", id="x", text="")
        staging.finish_unit(u, w)


def test_commit_is_atomic_and_manifest_counts(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), shard_rows=4)
    _write_units(store, "fp1", [0, 1])
    assert not store.is_committed("demo", "fp1")
    with pytest.raises(ArtifactError, match="unit 2 of 3 has not finished"):
        store.staging("demo", "fp1").commit({"stage": "demo", "fingerprint": "fp1"}, 3)
    assert not store.is_committed("demo", "fp1")
    art = store.staging("demo", "fp1").commit({"stage": "demo", "fingerprint": "fp1"}, 2)
    assert store.is_committed("demo", "fp1")
    assert not os.path.exists(tmp_path / "store" / "demo" / ".staging-fp1")
    m = Artifact.open(art.path).manifest
    assert m["rows"] == 20 and m["rejects_rows"] == 2
    assert m["shards"] == [f"part-0000{u}-000{k}.parquet" for u in (0, 1) for k in (0, 1, 2)]  # 4+4+2 rows
    assert m["stats"]["rows_in"] == 22 and m["stats"]["rejected"] == {"too_short": 2}
    assert [r["id"] for r in art.read_table().to_pylist()] == [f"d{i}" for i in range(20)]
    assert art.read_table(table="rejects").column("reason").to_pylist() == ["too_short", "too_short"]
    assert sum(b.num_rows for b in art.iter_batches(batch_size=3)) == 20


def test_unit_rerun_discards_partial_shards(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), shard_rows=4)
    staging = store.staging("demo", "fp")
    w = staging.begin_unit(0)
    w.write(docs(9))  # two full shards on disk, a third open: then the "worker dies"
    w.close()
    assert staging.unit_result(0) is None
    _write_units(store, "fp", [0])
    art = staging.commit({"stage": "demo", "fingerprint": "fp"}, 1)
    assert art.num_rows == 10
    assert len(os.listdir(art.path)) == 1 + 3 + 1  # manifest, 3 shards, rejects/


def test_open_refuses_uncommitted_and_missing(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    _write_units(store, "fp", [0])
    with pytest.raises(ArtifactError, match="not a committed artifact"):
        Artifact.open(str(tmp_path / "store" / "demo" / ".staging-fp"))
    with pytest.raises(ArtifactError, match="no artifact"):
        Artifact.open(str(tmp_path / "nothing"))


def test_refresh_replaces_committed_artifact(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    _write_units(store, "fp", [0])
    store.staging("demo", "fp").commit({"stage": "demo", "fingerprint": "fp"}, 1)
    _write_units(store, "fp", [0, 1])
    art = store.staging("demo", "fp").commit({"stage": "demo", "fingerprint": "fp"}, 2)
    assert art.num_rows == 20
    assert [name for name in os.listdir(tmp_path / "store" / "demo")] == ["fp"]


def test_fsspec_memory_store_commits_manifest_last():
    store = ArtifactStore("memory://kiln-test-store", shard_rows=5)
    _write_units(store, "fpm", [0, 1])
    art = store.staging("demo", "fpm").commit({"stage": "demo", "fingerprint": "fpm"}, 2)
    assert art.path.startswith("memory://")
    assert store.is_committed("demo", "fpm")
    again = Artifact.open(art.path)
    assert again.num_rows == 20 and again.read_table().num_rows == 20
    assert [s for s, _fp, _p in store.committed()] == ["demo"]


def test_stats_merge_and_roundtrip():
    a = StageStats(rows_in=3, rows_out=2, extra={"files": 1, "note": "x"})
    a.reject("r1")
    b = StageStats(rows_in=5, rows_out=3, extra={"files": 2})
    b.reject("r1")
    b.reject("r2")
    a.merge(b)
    assert (a.rows_in, a.rows_out, a.rejected, a.extra["files"]) == (8, 5, {"r1": 2, "r2": 1}, 3)
    assert a.rows_in == a.rows_out + a.rows_rejected
    assert StageStats.from_dict(json.loads(json.dumps(a.to_dict()))).to_dict() == a.to_dict()


def test_manifest_is_json_not_pickle(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    _write_units(store, "fp", [0])
    art = store.staging("demo", "fp").commit({"stage": "demo", "fingerprint": "fp"}, 1)
    with open(os.path.join(art.path, MANIFEST)) as f:
        assert json.load(f)["fingerprint"] == "fp"
    assert all(n.endswith((".parquet", ".json")) or n == "rejects" for n in os.listdir(art.path))


def test_named_tables_scratch_and_finalize(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), shard_rows=100)
    staging = store.staging("demo", "fpt")
    for u in (0, 1):
        w = staging.begin_unit(u)
        assert w.scratch and os.path.isdir(w.scratch)
        with open(os.path.join(w.scratch, "frontier.json"), "w") as f:
            f.write("[]")
        w.write(docs(3, start=u * 3))
        w.table("validation").write(docs(1, start=100 + u))
        w.stats.rows_in, w.stats.rows_out = 4, 4
        staging.finish_unit(u, w)
    # a restarted unit keeps its scratch but loses its partial shards, in every table
    w = staging.begin_unit(1)
    assert os.path.exists(os.path.join(w.scratch, "frontier.json"))
    assert not os.path.exists(os.path.join(staging.dir, "validation", "part-00001-0000.parquet"))
    w.write(docs(3, start=3))
    w.table("validation").write(docs(1, start=101))
    w.stats.rows_in, w.stats.rows_out = 4, 4
    staging.finish_unit(1, w)

    def finalize(directory, fs):
        with open(os.path.join(directory, "extra.txt"), "w") as f:
            f.write("made at commit")
        return {"extra_file": "extra.txt"}

    art = staging.commit({"stage": "demo", "fingerprint": "fpt"}, 2, finalize)
    assert art.table_names() == ["data", "rejects", "validation"]
    assert art.table_rows("validation") == 2 and art.num_rows == 6
    assert art.read_table(table="validation").column("id").to_pylist() == ["d100", "d101"]
    assert art.manifest["extra_file"] == "extra.txt" and os.path.exists(os.path.join(art.path, "extra.txt"))
    assert not os.path.exists(os.path.join(art.path, "_scratch"))


def test_failed_finalize_leaves_the_units_for_a_retry(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    _write_units(store, "fpf", [0, 1])

    def broken(directory, fs):
        raise OSError("disk full while writing the dataset")

    with pytest.raises(OSError, match="disk full"):
        store.staging("demo", "fpf").commit({"stage": "demo", "fingerprint": "fpf"}, 2, broken)
    assert not store.is_committed("demo", "fpf")
    art = store.staging("demo", "fpf").commit({"stage": "demo", "fingerprint": "fpf"}, 2, lambda d, fs: {"ok": True})
    assert art.num_rows == 20 and art.manifest["ok"] is True
