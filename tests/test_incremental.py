"""A corpus that grows night by night: each run reuses what did not change and equals a run from scratch.

Three nights of documents arrive as new files. After each night the pipeline (ingest -> clean -> minhash
-> dedup_candidates -> dedup_clusters -> dedup -> langid -> tokenize -> pack) runs into a store that holds the
earlier nights' artifacts, and, for comparison, into an empty store. Every artifact must be the same
(shard by shard, byte for byte where the layout is one unit's, row for row otherwise), the unchanged
shards' units must have been copied, and no document kept on an earlier night may be removed later.
"""

from __future__ import annotations

import random

import pytest

from tasks.artifacts import Artifact, ArtifactStore
from tasks.clean import CleanConfig, CleanStage
from tasks.dedup import DedupCandidatesStage, DedupClustersStage, DedupConfig, DedupStage, MinHashStage
from tasks.ingest import IngestConfig, IngestStage
from tasks.langid import LangIdConfig, LangIdStage
from tasks.pack import PackConfig, PackStage
from tasks.stage import run_in_store
from tasks.tokenize import TokenizeConfig, TokenizerConfig, TokenizerStage, TokenizeStage

from conftest import write_jsonl

SHARD_ROWS = 160  # content-defined source shards of ~20 documents: a few hundred documents make many shards


def _vocabulary() -> list[str]:
    import argparse
    import collections
    import json
    import pathlib
    import subprocess

    words: list[str] = []
    for mod in (subprocess, argparse, collections, json, pathlib):
        for obj in vars(mod).values():
            doc = getattr(obj, "__doc__", None) if callable(obj) else None
            if isinstance(doc, str):
                words += [w.lower() for w in doc.split() if w.isalpha()]
    return sorted(set(words) - {"javascript", "cookies", "lorem", "ipsum"})  # words the clean stage drops lines for


class Writer:
    """Documents of plain English words, each a few sentences; copies planted on purpose."""

    def __init__(self) -> None:
        self.rng = random.Random(11)
        self.vocab = _vocabulary()
        self.common = ["the", "of", "and", "to", "that", "with", "is", "be", "a", "in"]
        self.texts: dict[str, str] = {}

    def fresh(self, doc_id: str) -> dict[str, str]:
        sentences = []
        for _ in range(self.rng.randint(6, 9)):
            words = [self.rng.choice(self.vocab if self.rng.random() < 0.7 else self.common) for _ in range(12)]
            sentences.append(" ".join(words).capitalize() + ".")
        self.texts[doc_id] = " ".join(sentences)
        return {"id": doc_id, "text": self.texts[doc_id]}

    def exact(self, doc_id: str, of: str) -> dict[str, str]:
        self.texts[doc_id] = self.texts[of].upper()  # case never hides a copy
        return {"id": doc_id, "text": self.texts[doc_id]}

    def near(self, doc_id: str, of: str, edits: int = 1) -> dict[str, str]:
        words = self.texts[of].split()  # 70-110 words: one word changed leaves a Jaccard of about 0.9
        for k in range(edits):
            words[(k + 1) * len(words) // (edits + 1)] = "zebra"
        self.texts[doc_id] = " ".join(words)
        return {"id": doc_id, "text": self.texts[doc_id]}


def nights() -> list[dict[str, list[dict[str, str]]]]:
    w = Writer()
    one_a = [w.fresh(f"n1-{i:03d}") for i in range(110)]
    one_b = [w.fresh(f"n1-{i:03d}") for i in range(110, 200)]
    one_b += [
        w.exact("n1-copy-exact", "n1-003"),
        w.near("n1-copy-near", "n1-050"),
        w.exact("n1-copy-2", "n1-copy-near"),
    ]
    one_b += [w.near(f"n1-near-{i}", f"n1-{i:03d}") for i in range(60, 70)]
    two = [w.fresh(f"n2-{i:03d}") for i in range(40)]
    two += [
        w.exact("n2-of-n1", "n1-120"),  # a new document that copies an old one goes; the old one stays
        w.near("n2-near-n1", "n1-007"),
        w.exact("n2-of-removed", "n1-copy-exact"),  # copies a removed copy: goes, naming the kept original
        w.exact("n2-of-n2", "n2-005"),  # copies among the new documents
    ]
    three = [w.fresh(f"n3-{i:03d}") for i in range(30)]
    three += [w.near("n3-near-n2", "n2-011"), w.exact("n3-of-n1", "n1-199"), w.near("n3-near-n1", "n1-100", 2)]
    return [{"n1-a.jsonl": one_a, "n1-b.jsonl": one_b}, {"n2.jsonl": two}, {"n3.jsonl": three}]


def run_pipeline(store: ArtifactStore, corpus: str, tokenizer: Artifact) -> dict[str, Artifact]:
    dedup = DedupConfig()
    out: dict[str, Artifact] = {}
    out["ingest"] = docs = run_in_store(IngestStage(), IngestConfig(paths=[corpus]), [], store)
    out["clean"] = clean = run_in_store(CleanStage(), CleanConfig(), [docs], store)
    out["minhash"] = mh = run_in_store(MinHashStage(), dedup, [clean], store)
    out["dedup_candidates"] = cands = run_in_store(DedupCandidatesStage(), dedup, [mh], store)
    out["dedup_clusters"] = clusters = run_in_store(DedupClustersStage(), dedup, [cands, clean], store)
    out["dedup"] = kept = run_in_store(DedupStage(), dedup, [clean, clusters], store)
    out["langid"] = lang = run_in_store(LangIdStage(), LangIdConfig(), [kept], store)
    out["tokenize"] = tokens = run_in_store(TokenizeStage(), TokenizeConfig(), [lang, tokenizer], store)
    out["pack"] = run_in_store(PackStage(), PackConfig(seq_len=64, hf_dataset=False), [tokens], store)
    return out


def reused(art: Artifact) -> int:
    return sum(1 for u in art.manifest.get("unit_results", ()) if u.get("reused_from"))


def rows(art: Artifact, table: str) -> list[dict]:
    return art.read_table(table=table).to_pylist() if art.table_rows(table) else []


@pytest.mark.slow
def test_a_corpus_grown_in_three_nights_equals_a_run_from_scratch_each_night(tmp_path):
    corpus = tmp_path / "corpus"
    grown = ArtifactStore(str(tmp_path / "grown"), shard_rows=SHARD_ROWS)
    kept_before: set[str] = set()
    tokenizer = None
    previous: dict[str, Artifact] = {}
    for night, files in enumerate(nights(), 1):
        for name, records in files.items():
            write_jsonl(corpus / name, records)
        if tokenizer is None:  # one tokenizer for every night (trained on the first), as a schedule pins it
            first = run_in_store(
                IngestStage(), IngestConfig(paths=[str(corpus)]), [], ArtifactStore(str(tmp_path / "t"))
            )
            tokenizer = run_in_store(
                TokenizerStage(), TokenizerConfig(vocab_size=400), [first], ArtifactStore(str(tmp_path / "t"))
            )
        inc = run_pipeline(grown, str(corpus), tokenizer)
        scratch = run_pipeline(
            ArtifactStore(str(tmp_path / f"scratch-{night}"), shard_rows=SHARD_ROWS), str(corpus), tokenizer
        )

        for stage, art in inc.items():
            ref = scratch[stage]
            assert art.fingerprint == ref.fingerprint, stage
            for table in sorted(set(art.table_names()) | set(ref.table_names())):
                assert rows(art, table) == rows(ref, table), f"night {night}: {stage} table {table}"
            if stage != "dedup_clusters":  # one unit: same rows; elsewhere the very same shards
                assert art.manifest["tables"]["data"].get("digests") == ref.manifest["tables"]["data"].get("digests"), (
                    stage
                )
            assert art.stats.rows_in == ref.stats.rows_in and art.stats.rejected == ref.stats.rejected, stage

        kept = set(inc["dedup"].read_table(columns=["id"]).column("id").to_pylist())
        assert kept_before <= kept, f"night {night} removed documents kept before: {sorted(kept_before - kept)}"
        removed = {r["id"]: r for r in rows(inc["dedup_clusters"], "data")}
        shards = len(inc["clean"].shards())
        if night == 1:
            assert reused(inc["clean"]) == 0 and shards >= 8
            assert {"n1-copy-exact", "n1-copy-near", "n1-copy-2"} <= set(removed)
        else:
            # the new night's file adds shards; every shard of the earlier nights is copied, not recomputed
            before = len(previous["clean"].shards())
            for stage in ("clean", "minhash", "dedup", "langid", "tokenize"):
                assert reused(inc[stage]) >= before - 1, (night, stage, reused(inc[stage]), before)
            assert inc["dedup_clusters"].stats.extra["continued_from"] == previous["dedup_clusters"].fingerprint
            assert "continued_from" not in scratch["dedup_clusters"].stats.extra
            # only the new pairs' documents and the kept documents they meet are read again
            extra, scratch_extra = inc["dedup_clusters"].stats.extra, scratch["dedup_clusters"].stats.extra
            assert extra["pairs_judged_earlier"] >= 13
            assert extra["candidate_docs_read"] <= scratch_extra["candidate_docs_read"] - 20
        if night == 2:
            assert removed["n2-of-n1"]["kept_id"] == "n1-120"
            assert removed["n2-near-n1"]["kept_id"] == "n1-007"
            assert removed["n2-of-removed"]["kept_id"] == "n1-003"
            assert removed["n2-of-n2"]["kept_id"] == "n2-005"
        if night == 3:
            assert removed["n3-near-n2"]["kept_id"] == "n2-011" and removed["n3-of-n1"]["kept_id"] == "n1-199"
            assert removed["n3-near-n1"]["kept_id"] == "n1-100"
        kept_before = kept
        previous = inc
