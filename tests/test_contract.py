"""The stage contract's shared promises: rows in = kept + rejected by construction, unique ids in source
stages, lone shards cut into row ranges so every worker has work, `kiln stage` leaving nothing behind."""

from __future__ import annotations

import json
import os
import random
from typing import Any

import pytest

from tasks.artifacts import Artifact, ArtifactStore, ArtifactWriter, read_unit
from tasks.clean import CleanConfig, CleanStage
from tasks.ingest import IngestConfig, IngestStage
from tasks.langid import LangIdConfig, LangIdStage
from tasks.stage import Stage, StageConfig, UnbalancedUnit, plan_units, run_in_store

from conftest import write_jsonl

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree near "
    "the quiet river and children play games in the sunny park every single afternoon"
).split()


def corpus_file(path, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
        records.append({"id": f"d{i}", "text": text.capitalize() + "."})
    return write_jsonl(path, records)


def test_a_lone_shard_is_cut_into_row_ranges_and_the_rows_are_the_same(tmp_path):
    path = corpus_file(tmp_path / "one.jsonl", 5000)
    store = ArtifactStore(str(tmp_path / "s"))
    docs = run_in_store(IngestStage(), IngestConfig(paths=[path]), [], store)
    assert len(docs.shards()) == 1 and docs.shard_rows() == [5000]
    assert plan_units(CleanStage(), [docs], CleanConfig(), workers=2) == [
        {"input": 0, "shard": 0, "rows": [0, 2500]},
        {"input": 0, "shard": 0, "rows": [2500, 5000]},
    ]
    assert len(plan_units(CleanStage(), [docs], CleanConfig(), workers=8)) == 2  # never below 2,000 rows a unit
    for stage, cfg in ((CleanStage(), CleanConfig()), (LangIdStage(), LangIdConfig(languages=["en"]))):
        one = run_in_store(stage, cfg, [docs], ArtifactStore(str(tmp_path / f"one-{stage.name}")))
        two = run_in_store(stage, cfg, [docs], ArtifactStore(str(tmp_path / f"two-{stage.name}")), workers=2)
        assert one.fingerprint == two.fingerprint and one.manifest["units"] == 1 and two.manifest["units"] == 2
        assert two.read_table().equals(one.read_table()) and two.stats.rejected == one.stats.rejected
        assert two.stats.rows_in == 5000 == two.stats.rows_out + two.stats.rows_rejected


def test_ids_are_unique_within_an_artifact(tmp_path):
    write_jsonl(
        tmp_path / "in" / "a.jsonl",
        [{"id": "x", "text": "first x"}, {"id": "y", "text": "y"}, {"id": "x", "text": "x again, same file"}],
    )
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": "y", "text": "y from another file"}, {"id": "z", "text": "z"}])
    art = run_in_store(
        IngestStage(), IngestConfig(paths=[str(tmp_path / "in")], unit_files=1), [], ArtifactStore(str(tmp_path / "s"))
    )
    assert art.manifest["units"] == 2
    kept = art.read_table().to_pylist()
    assert [(r["id"], r["text"]) for r in kept] == [("x", "first x"), ("y", "y"), ("z", "z")]
    rejects = sorted(
        (r["id"], r["text"], r["reason"], r["detail"]) for r in art.read_table(table="rejects").to_pylist()
    )
    assert rejects == [
        ("x", "x again, same file", "duplicate_id", "id 'x' repeats a row kept in unit 0"),
        ("y", "y from another file", "duplicate_id", "id 'y' repeats a row kept in unit 0"),
    ]
    st = art.stats
    assert st.rejected == {"duplicate_id": 2} and st.rows_in == 5 == st.rows_out + st.rows_rejected
    assert art.num_rows == 3 and art.manifest["rejects_rows"] == 2
    # the unit that lost rows is not offered for reuse: what it kept depends on the units before it
    assert [u["unit"] for u in art.manifest["unit_results"] if u.get("key")] == [0]
    assert sorted(os.listdir(art.path)) == sorted(["_manifest.json", "rejects", *[s for s in art.manifest["shards"]]])


class LosesRows(Stage):
    name = "loses_rows"
    version = 1
    Config = StageConfig
    balanced = True

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: StageConfig, out: ArtifactWriter) -> None:
        for batch in read_unit(inputs[0], unit, stats=out.stats):
            out.write(batch.slice(1))  # one row neither kept nor rejected


def test_a_row_that_vanishes_unaccounted_fails_the_unit(tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    docs = run_in_store(IngestStage(), IngestConfig(paths=[corpus_file(tmp_path / "c.jsonl", 10)]), [], store)
    with pytest.raises(UnbalancedUnit, match="10 rows in, but 9 kept \\+ 0 rejected"):
        run_in_store(LosesRows(), StageConfig(), [docs], store)


def test_kiln_stage_uses_the_workers_and_leaves_no_temporary_directory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    path = corpus_file(tmp_path / "one.jsonl", 4400)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    r = CliRunner().invoke(
        app, ["stage", "clean", "-i", path, "-o", str(tmp_path / "out"), "--workers", "2"], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    assert os.listdir(tmp) == []
    out = Artifact.open(str(tmp_path / "out"))
    assert out.manifest["units"] == 2 and out.stats.rows_in == 4400
    ref = run_in_store(
        CleanStage(),
        CleanConfig(),
        [run_in_store(IngestStage(), IngestConfig(paths=[path]), [], ArtifactStore(str(tmp_path / "s")))],
        ArtifactStore(str(tmp_path / "s")),
    )
    assert out.read_table().equals(ref.read_table())
    assert json.loads(json.dumps(out.manifest["stats"]["rejected"])) == ref.stats.rejected
