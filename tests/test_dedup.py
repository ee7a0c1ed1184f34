"""Dedup chain: planted exact / near duplicates, exactly which ids go, and why."""

from __future__ import annotations

import inspect
import random
import re

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.artifacts import ArtifactStore
from tasks.dedup import DedupCandidatesStage, DedupClustersStage, DedupConfig, DedupStage, MinHashStage
from tasks.dedup.hashing import candidate_probability, choose_bands, normalise_for_dedup, shingle_batch
from tasks.ingest import IngestConfig, IngestStage
from tasks.stage import StageInputError, run_in_store

from conftest import write_jsonl


def _base_texts(n: int) -> list[str]:
    """Real English: docstrings of standard-library functions, long enough for 5-gram shingles."""
    import argparse, collections, email.message, json as _json, os, pathlib, shutil, subprocess, textwrap, typing  # noqa

    seen, out = set(), []
    for mod in (subprocess, shutil, os, pathlib, argparse, collections, typing, textwrap, _json, email.message):
        for _name, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc.split()) >= 60 and normalise_for_dedup(doc) not in seen:
                seen.add(normalise_for_dedup(doc))
                out.append(doc)
    assert len(out) >= n
    return out[:n]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t):
        w = normalise_for_dedup(t).split()
        return {tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def _edit_words(text: str, every: int, rng: random.Random) -> str:
    words = text.split()
    for i in range(every // 2, len(words), every):
        words[i] = rng.choice(["zebra", "quartz", "violin", "meadow"])
    return " ".join(words)


def _ingest(tmp_path, files: dict[str, list[dict]]):
    paths = [write_jsonl(tmp_path / "in" / name, recs) for name, recs in files.items()]
    store = ArtifactStore(str(tmp_path / "store"))
    return store, run_in_store(IngestStage(), IngestConfig(paths=paths), [], store)


def _chain(store, docs, **cfg):
    c = DedupConfig(**cfg)
    mh = run_in_store(MinHashStage(), c, [docs], store)
    cands = run_in_store(DedupCandidatesStage(), c, [mh], store)
    clusters = run_in_store(DedupClustersStage(), c, [cands, docs], store)
    return run_in_store(DedupStage(), c, [docs, clusters], store), clusters


@pytest.fixture
def planted(tmp_path):
    rng = random.Random(7)
    base = _base_texts(12)
    a = [{"id": f"orig-{i}", "text": t} for i, t in enumerate(base)]
    b0 = base[0]
    paras = base[3].split("\n\n")
    copies = [
        {"id": "exact-of-0", "text": b0},
        {"id": "case-space-of-1", "text": re.sub(r"\s+", "   ", base[1].upper())},
        {"id": "punct-of-2", "text": base[2].replace(".", " ,").replace(" ", "\n")},
        {"id": "reorder-of-3", "text": "\n\n".join(paras[1:] + paras[:1]) if len(paras) > 1 else base[3] + " ok"},
        {"id": "light-edit-of-4", "text": _edit_words(base[4], 40, rng)},
        {"id": "heavy-edit-of-5", "text": _edit_words(base[5], 4, rng)},
        {"id": "boilerplate-of-6", "text": base[6] + "\n\nShare this page."},
    ]
    store, docs = _ingest(tmp_path, {"a.jsonl": a, "b.jsonl": copies})
    return store, docs, base, copies


def test_planted_duplicates_exactly_which_removed(planted):
    store, docs, base, copies = planted
    by_id = {c["id"]: c["text"] for c in copies}
    assert _jaccard(base[4], by_id["light-edit-of-4"]) >= 0.8  # the planted levels are what we claim
    assert _jaccard(base[5], by_id["heavy-edit-of-5"]) < 0.5
    out, clusters = _chain(store, docs)
    kept = set(out.read_table().column("id").to_pylist())
    rej = {r["id"]: r for r in out.read_table(table="rejects").to_pylist()}
    assert set(rej) == {
        "exact-of-0",
        "case-space-of-1",
        "punct-of-2",
        "reorder-of-3",
        "light-edit-of-4",
        "boilerplate-of-6",
    }
    assert "heavy-edit-of-5" in kept and all(f"orig-{i}" in kept for i in range(12))
    assert rej["exact-of-0"]["reason"] == "exact_duplicate"
    assert rej["case-space-of-1"]["reason"] == "exact_duplicate"  # case/whitespace never hide a copy
    assert rej["punct-of-2"]["reason"] == "exact_duplicate"
    assert rej["light-edit-of-4"]["reason"] == "near_duplicate"
    assert "duplicate of orig-4" in rej["light-edit-of-4"]["detail"]
    st = out.stats
    assert st.rows_in == 19 == st.rows_out + st.rows_rejected
    assert st.rejected == {"exact_duplicate": 3, "near_duplicate": 3}
    cl = clusters.read_table(table="clusters").to_pylist()
    assert sorted(c["kept_id"] for c in cl) == ["orig-0", "orig-1", "orig-2", "orig-3", "orig-4", "orig-6"]
    assert all(c["size"] == 2 for c in cl)


def test_below_threshold_candidates_are_kept(tmp_path):
    """A pair LSH proposes but whose true Jaccard is under the threshold stays: verified, not estimated."""
    base = _base_texts(2)
    rng = random.Random(3)
    edited = _edit_words(base[0], 20, rng)
    j = _jaccard(base[0], edited)
    assert 0.4 < j < 0.8
    store, docs = _ingest(tmp_path, {"a.jsonl": [{"id": "o", "text": base[0]}, {"id": "e", "text": edited}]})
    # a very permissive LSH shape makes them candidates for sure
    out, clusters = _chain(store, docs, threshold=min(0.95, j + 0.05), num_perm=64, bands=32, rows=2)
    assert sorted(out.read_table().column("id").to_pylist()) == ["e", "o"]
    assert clusters.stats.rejected == {"below_threshold": 1}
    # ... and with the threshold under their similarity, the later one goes
    out2, _ = _chain(store, docs, threshold=j - 0.05, num_perm=64, bands=32, rows=2)
    assert out2.read_table().column("id").to_pylist() == ["o"]


def test_keep_longest_and_exact_only(tmp_path):
    base = _base_texts(1)[0]
    store, docs = _ingest(
        tmp_path,
        {
            "a.jsonl": [
                {"id": "short", "text": base},
                {"id": "long", "text": base + " And one more sentence at the end."},
                {"id": "same", "text": base.lower()},
            ]
        },
    )
    out, _ = _chain(store, docs, keep="longest")
    assert out.read_table().column("id").to_pylist() == ["long"]
    out2, _ = _chain(store, docs, near=False)
    assert sorted(out2.read_table().column("id").to_pylist()) == ["long", "short"]
    assert out2.stats.rejected == {"exact_duplicate": 1}


def test_bad_input_never_crashes(tmp_path):
    big = ("mixed scripts Кириллица 漢字 עברית " * 2_000_000)[:50_000_000]  # a 50 MB document
    recs = [
        {"id": "empty-1", "text": "..."},
        {"id": "empty-2", "text": "!!!"},  # normalise to nothing
        {"id": "ctrl", "text": "a\x00b\x07c\x1b[0m d e f g h"},
        {"id": "ctrl2", "text": "A B\x00C D E F G H"},
        {"id": "big", "text": big},
        {"id": "mixed", "text": "English текст 中文 mixed 123"},
    ]
    store, docs = _ingest(tmp_path, {"a.jsonl": recs})
    out, _ = _chain(store, docs)
    st = out.stats
    assert st.rows_in == 6 == st.rows_out + st.rows_rejected
    rej = {r["id"]: r["reason"] for r in out.read_table(table="rejects").to_pylist()}
    assert rej == {"empty-2": "exact_duplicate"}  # punctuation-only texts are one and the same text


def test_config_refused_naming_field():
    with pytest.raises(ValidationError, match="bands"):
        DedupConfig(bands=4)
    with pytest.raises(ValidationError, match="num_perm"):
        DedupConfig(bands=40, rows=4, num_perm=128)
    with pytest.raises(ValidationError, match="thresh"):
        DedupConfig(thresh=0.5)


def test_dedup_alone_runs_the_chain_and_refuses_foreign_clusters(planted, tmp_path):
    store, docs, _base, _copies = planted
    alone = run_in_store(DedupStage(), DedupConfig(), [docs], store)
    assert alone.stats.rejected == {"exact_duplicate": 3, "near_duplicate": 3}
    _other_store, other_docs = _ingest(tmp_path / "o", {"x.jsonl": [{"id": "x", "text": "other corpus text"}]})
    _out, clusters = _chain(store, docs)
    with pytest.raises(StageInputError, match="other documents"):
        run_in_store(DedupStage(), DedupConfig(), [other_docs, clusters], store)


def test_lsh_shape_and_shingles():
    b, r = choose_bands(128, 0.8)
    assert b * r <= 128 and candidate_probability(0.8, b, r) >= 0.995
    sb = shingle_batch([normalise_for_dedup(t) for t in ["One two three four five six", "", "a b"]], 5)
    assert np.diff(sb.offsets).tolist() == [2, 0, 1] and sb.words.tolist() == [6, 0, 2]
    same = shingle_batch(["alpha beta gamma delta epsilon", "alpha beta gamma delta epsilon"], 5).hashes
    assert same[0] == same[1]


def test_dask_local_cluster_keeps_same_ids(planted, tmp_path):
    """Units of every phase run on Dask workers give the one-process result."""
    from distributed import Client, LocalCluster

    from tasks.stage import commit_stage, run_unit

    store, docs, _base, _copies = planted
    one_process, _ = _chain(store, docs)
    dstore = ArtifactStore(str(tmp_path / "dask-store"))
    cfg = DedupConfig()

    def run_distributed(client, stage, inputs):
        fp = stage.fingerprint(cfg, [a.fingerprint for a in inputs])
        units = stage.plan(inputs, cfg)
        staging = dstore.staging(stage.name, fp)
        futures = [client.submit(run_unit, stage, cfg, inputs, staging, i, u, pure=False) for i, u in enumerate(units)]
        client.gather(futures)
        return commit_stage(stage, cfg, inputs, staging, fp, len(units))

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None, processes=True
        ) as cluster,
        Client(cluster) as client,
    ):
        mh = run_distributed(client, MinHashStage(), [docs])
        cands = run_distributed(client, DedupCandidatesStage(), [mh])
        clusters = run_distributed(client, DedupClustersStage(), [cands, docs])
        out = run_distributed(client, DedupStage(), [docs, clusters])
    assert out.read_table().column("id").to_pylist() == one_process.read_table().column("id").to_pylist()
    assert out.fingerprint == one_process.fingerprint
