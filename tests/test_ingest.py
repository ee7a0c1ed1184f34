"""The ingest stage: every format, every kind of bad record, nothing silently lost."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.artifacts import ArtifactStore
from tasks.ingest import IngestConfig, IngestStage
from tasks.stage import StageInputError, run_in_store

from conftest import write_jsonl


def ingest(tmp_path, **cfg):
    store = ArtifactStore(str(tmp_path / "store"))
    return run_in_store(IngestStage(), IngestConfig(**cfg), [], store)


def rejects_by_id(art):
    return {r["detail"] or "": r for r in art.read_table(table="rejects").to_pylist()}


def test_jsonl_bad_records_go_to_rejects_with_reasons(tmp_path, corpus):
    art = ingest(tmp_path, paths=[str(corpus / "bad.jsonl")])
    st = art.stats
    assert st.rows_in == 7 == st.rows_out + st.rows_rejected
    assert st.rejected == {
        "empty_text": 1,
        "non_string_text": 1,
        "missing_text": 1,
        "invalid_utf8": 1,
        "invalid_json": 1,
        "not_an_object": 1,
    }
    kept = art.read_table().to_pylist()
    assert [d["id"] for d in kept] == ["kept"]
    rej = art.read_table(table="rejects").to_pylist()
    lines = {json.loads(r["meta"])["_ingest"]["line"]: r for r in rej}
    assert lines[5]["reason"] == "invalid_utf8" and "caf" in lines[5]["text"]
    assert lines[6]["reason"] == "invalid_json" and lines[6]["text"] == "{oops"
    assert set(art.read_table(table="rejects").column_names) >= {"reason", "detail", "text", "source"}


def test_ids_kept_or_stable_and_schema(tmp_path):
    p = write_jsonl(
        tmp_path / "a.jsonl",
        [{"id": 17, "text": "with an int id"}, {"text": "no id", "url": "http://x/1", "lang": "en", "tag": "t"}],
    )
    a1 = ingest(tmp_path, paths=[p]).read_table().to_pylist()
    a2 = ingest(tmp_path / "again", paths=[p]).read_table().to_pylist()
    assert a1 == a2  # deterministic, ids included
    assert a1[0]["id"] == "17"
    assert len(a1[1]["id"]) == 20 and a1[1]["url"] == "http://x/1" and a1[1]["lang"] == "en"
    meta = json.loads(a1[1]["meta"])
    assert meta["tag"] == "t" and meta["_ingest"] == {"file": p, "line": 2}
    assert set(a1[0]) == {"id", "text", "source", "url", "lang", "meta"}


def test_parquet_missing_and_non_string_text_and_binary(tmp_path):
    p1 = str(tmp_path / "typed.parquet")
    pq.write_table(pa.table({"text": pa.array(["ok", None, ""], pa.string()), "id": ["a", "b", "c"]}), p1)
    p2 = str(tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), p2)
    p3 = str(tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"body": ["x"]}), p3)
    p4 = str(tmp_path / "binary.parquet")
    pq.write_table(pa.table({"text": pa.array([b"good bytes", b"\xff\xfe bad"], pa.binary())}), p4)
    art = ingest(tmp_path, paths=[p1, p2, p3, p4])
    st = art.stats
    assert st.rows_in == 3 + 2 + 1 + 2
    assert st.rejected == {"missing_text": 2, "empty_text": 1, "non_string_text": 2, "invalid_utf8": 1}
    assert sorted(art.read_table().column("text").to_pylist()) == ["good bytes", "ok"]


def test_text_files_json_arrays_gzip_and_surrogates(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_bytes(b"\xef\xbb\xbfBOM stripped text")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.md").write_text("")
    (d / "skip.bin").write_bytes(b"\x00\x01")  # not a known extension: not read when walking a dir
    (d / "arr.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}, "three"]))
    (d / "lone.jsonl").write_text('{"text": "bad \\ud800 surrogate"}\n')
    with gzip.open(d / "z.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n')
    with open(d / "trunc.jsonl.gz", "wb") as f:
        whole = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(5000)))
        f.write(whole[: len(whole) // 2])
    art = ingest(tmp_path, paths=[str(d)])
    st = art.stats
    assert st.rows_in == st.rows_out + st.rows_rejected
    texts = sorted(art.read_table().column("text").to_pylist())
    assert "BOM stripped text" in texts and "zipped" in texts and "one" in texts and "two" in texts
    assert st.rejected["invalid_utf8"] == 2  # latin-1 file, lone surrogate
    assert st.rejected["empty_text"] == 1 and st.rejected["not_an_object"] == 1
    assert st.rejected["unreadable_file"] == 1  # truncated gzip keeps the lines before the damage
    assert "line 0" in texts and "line 4999" not in texts
    assert st.extra["files"] == 7


def test_corrupt_parquet_is_counted_not_fatal(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1 this is not really parquet")
    good = write_jsonl(tmp_path / "g.jsonl", [{"text": "survives"}])
    art = ingest(tmp_path, paths=[str(p), good])
    assert art.stats.rejected == {"unreadable_file": 1}
    assert art.read_table().column("text").to_pylist() == ["survives"]


def test_hf_dataset_on_disk(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2", ""], "label": [0, 1, 2]}),
            "test": datasets.Dataset.from_dict({"text": ["x1"], "label": [3]}),
        }
    )
    path = str(tmp_path / "hfds")
    dd.save_to_disk(path)
    art = ingest(tmp_path, paths=[path])
    rows = art.read_table().to_pylist()
    assert [r["text"] for r in rows] == ["x1", "t1", "t2"]  # splits in name order
    assert json.loads(rows[0]["meta"])["_ingest"]["split"] == "test"
    assert json.loads(rows[1]["meta"])["label"] == 0
    assert art.stats.rejected == {"empty_text": 1}


def test_globs_and_missing_paths(tmp_path, corpus):
    art = ingest(tmp_path, paths=[str(corpus / "*.jsonl")])
    assert art.stats.extra["files"] == 2
    with pytest.raises(StageInputError, match=r"paths\[1\]: no such file"):
        ingest(tmp_path, paths=[str(corpus), str(tmp_path / "missing.jsonl")])
    with pytest.raises(StageInputError, match=r"paths\[0\]: no files match"):
        ingest(tmp_path, paths=[str(tmp_path / "*.nothing")])


def test_small_files_grouped_into_units_same_content(tmp_path):
    d = tmp_path / "many"
    for i in range(30):
        write_jsonl(d / f"f{i:02d}.jsonl", [{"id": f"{i}-{j}", "text": f"text {i} {j}"} for j in range(3)])
    grouped = ingest(tmp_path / "a", paths=[str(d)], unit_files=8)
    single = ingest(tmp_path / "b", paths=[str(d)], unit_files=1)
    assert grouped.manifest["units"] == 4 and single.manifest["units"] == 30
    assert grouped.fingerprint == single.fingerprint  # unit size is an execution detail
    assert grouped.read_table().equals(single.read_table())


def test_unchanged_files_are_copied_when_files_are_added_or_changed(tmp_path):
    d = tmp_path / "grow"
    for i in range(3):
        write_jsonl(d / f"f{i:02d}.jsonl", [{"id": f"{i}-{j}", "text": f"text {i} {j}"} for j in range(3)])
    first = ingest(tmp_path, paths=[str(d)], unit_files=1)
    write_jsonl(d / "f03.jsonl", [{"id": "3-0", "text": "a new file"}])
    write_jsonl(d / "f01.jsonl", [{"id": "1-0", "text": "this file was rewritten"}])
    second = ingest(tmp_path, paths=[str(d)], unit_files=1)
    reused = [u.get("reused_from") for u in second.manifest["unit_results"]]
    assert reused == [first.fingerprint, None, first.fingerprint, None]
    fresh = ingest(tmp_path / "fresh", paths=[str(d)], unit_files=1)  # an empty store: everything read
    assert fresh.fingerprint == second.fingerprint and second.read_table().equals(fresh.read_table())
    assert second.stats.to_dict()["rows_out"] == fresh.stats.to_dict()["rows_out"] == 8


def test_changed_input_file_changes_fingerprint(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "v1"}])
    fp1 = IngestStage().fingerprint(IngestConfig(paths=[p]), [])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "v2 longer"}])
    fp2 = IngestStage().fingerprint(IngestConfig(paths=[p]), [])
    assert fp1 != fp2


def test_huge_rejected_line_is_truncated(tmp_path):
    p = tmp_path / "huge.jsonl"
    p.write_bytes(b"{" + b"x" * 200_000 + b"\n")
    art = ingest(tmp_path, paths=[str(p)])
    rej = art.read_table(table="rejects").to_pylist()[0]
    assert rej["reason"] == "invalid_json" and len(rej["text"]) == 65_536 and "truncated" in rej["detail"]
