"""Exact and near-duplicate removal as four chained stages: map -> shuffle -> reduce -> filter.

    minhash           (map, one unit per document shard) shingles and MinHash signatures; writes one
                      row per (document, LSH band) -- and one per document for the exact hash -- into
                      tables p000..pNNN partitioned by bucket-hash prefix: that is the shuffle.
    dedup_candidates  (reduce, one unit per partition) documents sharing a bucket become candidate
                      pairs (each member linked to the bucket's first document).
    dedup_clusters    (one unit) candidate pairs verified by the true Jaccard of their shingle sets
                      (recomputed from the documents; only candidates are read), union-find over the
                      verified pairs into connected components; inside a component, documents in
                      survivor order are removed only if they match a kept one at the threshold;
                      writes the removal list and the clusters.
    dedup             (filter, one unit per document shard) drops the listed documents as rejects
                      with reason exact_duplicate / near_duplicate, naming the kept document.

Every phase is a content-addressed artifact, so each resumes on its own and its units spread over
Dask or Ray like any stage. A document is addressed by a 64-bit *key* (which document input, which
shard, which row), which is also the deterministic corpus order used to pick the survivor.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts import Artifact, ArtifactStore, ArtifactWriter, fingerprint, read_unit, unit_first_row
from tasks.dedup.config import DedupConfig
from tasks.dedup.hashing import (
    MinHasher,
    band_buckets,
    exact_hash,
    jaccard_sorted_unique,
    normalise_for_dedup,
    shingle_batch,
)
from tasks.documents import MAX_REJECT_TEXT_CHARS, REJECT_SCHEMA
from tasks.stage import Stage, StageInputError

# key = input << 48 | shard << 28 | row
_ROW_BITS = 28
_SHARD_BITS = 20
EXACT_BAND = -1
# Text beyond this many characters is not hashed: a 50 MB document is compared on its first 2 M
# characters, which is plenty to tell a copy, and keeps memory per batch bounded.
HASH_CHARS = 2_000_000
BATCH_CHARS = 8_000_000

BUCKET_SCHEMA = pa.schema([("band", pa.int16()), ("bucket", pa.int64()), ("doc", pa.int64())])
SIGNED_SCHEMA = pa.schema([("doc", pa.int64()), ("id", pa.string()), ("exact", pa.int64()), ("shingles", pa.int32())])
EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("exact", pa.bool_())])
REMOVAL_SCHEMA = pa.schema(
    [
        ("doc", pa.int64()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("kept_doc", pa.int64()),
        ("kept_id", pa.string()),
        ("jaccard", pa.float32()),
        ("cluster_size", pa.int32()),
    ]
)
CLUSTER_SCHEMA = pa.schema(
    [("kept_doc", pa.int64()), ("kept_id", pa.string()), ("size", pa.int32()), ("members", pa.list_(pa.string()))]
)


def doc_key(input_index: int, shard: int, row: int | np.ndarray) -> Any:
    return (input_index << 48) | (shard << _ROW_BITS) | row


def split_key(key: int) -> tuple[int, int, int]:
    return key >> 48, (key >> _ROW_BITS) & ((1 << _SHARD_BITS) - 1), key & ((1 << _ROW_BITS) - 1)


def _documents(inputs: list[Artifact], exclude: tuple[str, ...]) -> list[Artifact]:
    return [a for a in inputs if a.stage not in exclude]


def _one(inputs: list[Artifact], stage: str) -> Artifact:
    found = [a for a in inputs if a.stage == stage]
    if len(found) != 1:
        raise StageInputError("inputs", f"expects exactly one {stage} artifact, got {len(found)}")
    return found[0]


def _read_shard(artifact: Artifact, shard: int, columns: list[str]) -> pa.Table:
    path = artifact.shards()[shard]
    with artifact.fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _text_slice(text: Any) -> str:
    if not isinstance(text, str):
        return ""
    return text if len(text) <= HASH_CHARS else text[:HASH_CHARS]


# --------------------------------------------------------------------------------------------------
# map


class MinHashStage(Stage):
    """Signatures and LSH band buckets, shuffled into partitions by bucket hash."""

    name = "minhash"
    version = 1
    Config = DedupConfig
    splittable = True
    fields = {"exact", "near", "ngram", "threshold", "num_perm", "bands", "rows", "seed", "partitions"}

    def fingerprint(self, cfg: DedupConfig, input_fingerprints: list[str]) -> str:
        return fingerprint(self.name, self.version, cfg.subset(self.fields), input_fingerprints)

    def plan(self, inputs: list[Artifact], cfg: DedupConfig) -> list[dict[str, Any]]:
        docs = inputs
        if len(docs) >= 1 << 15:
            raise StageInputError("inputs", "too many document inputs")
        for a in docs:
            if len(a.shards()) >= 1 << _SHARD_BITS:
                raise StageInputError("inputs", f"{a.path} has too many shards for dedup keys")
        return [{"input": i, "shard": s} for i, a in enumerate(docs) for s in range(len(a.shards()))]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: DedupConfig, out: ArtifactWriter) -> None:
        bands, rows = cfg.lsh_shape()
        hasher = MinHasher(cfg.num_perm, cfg.seed) if cfg.near else None
        artifact = inputs[unit["input"]]
        row0 = unit_first_row(unit)  # a document's key is its row in the shard, wherever the unit starts
        pending: list[tuple[str, str]] = []
        pending_chars = 0
        tables = [out.table(f"p{k:03d}") for k in range(cfg.partitions)]

        def flush() -> None:
            nonlocal row0, pending, pending_chars
            if not pending:
                return
            n = len(pending)
            ids = [p[0] for p in pending]
            norm = [normalise_for_dedup(p[1]) for p in pending]
            keys = doc_key(unit["input"], unit["shard"], np.arange(row0, row0 + n, dtype=np.int64))
            exact = np.fromiter((exact_hash(t) for t in norm), np.int64, n)
            parts_band, parts_bucket, parts_doc = [], [], []
            shingle_counts = np.zeros(n, np.int32)
            if cfg.exact:
                parts_band.append(np.full(n, EXACT_BAND, np.int16))
                parts_bucket.append(exact)
                parts_doc.append(keys)
            if hasher is not None:
                batch = shingle_batch(norm, cfg.ngram)
                shingle_counts = np.diff(batch.offsets).astype(np.int32)
                has = shingle_counts > 0  # empty documents are matched by the exact hash alone
                if has.any():
                    sig = hasher.signatures(batch)[has]
                    buckets = band_buckets(sig, bands, rows)  # (docs, bands)
                    m = buckets.shape[0]
                    parts_band.append(np.tile(np.arange(bands, dtype=np.int16), m))
                    parts_bucket.append(buckets.reshape(-1))
                    parts_doc.append(np.repeat(keys[has], bands))
            band = np.concatenate(parts_band)
            bucket = np.concatenate(parts_bucket)
            doc = np.concatenate(parts_doc)
            part = (bucket.view(np.uint64) % np.uint64(cfg.partitions)).astype(np.int64)
            order = np.argsort(part, kind="stable")
            part, band, bucket, doc = part[order], band[order], bucket[order], doc[order]
            bounds = np.searchsorted(part, np.arange(cfg.partitions + 1))
            for k in range(cfg.partitions):
                lo, hi = bounds[k], bounds[k + 1]
                if hi > lo:
                    tables[k].write(pa.record_batch([band[lo:hi], bucket[lo:hi], doc[lo:hi]], schema=BUCKET_SCHEMA))
            out.write(pa.record_batch([keys, pa.array(ids, pa.string()), exact, shingle_counts], schema=SIGNED_SCHEMA))
            out.count("bucket_rows", int(band.size))
            row0 += n
            pending, pending_chars = [], 0

        for batch in read_unit(artifact, unit, ["id", "text"], stats=out.stats):
            ids = batch.column(0).to_pylist()
            texts = batch.column(1).to_pylist()
            for doc_id, text in zip(ids, texts):
                t = _text_slice(text)
                if len(t) > HASH_CHARS - 1:
                    out.count("truncated_for_hashing")
                pending.append((doc_id if doc_id is not None else "", t))
                pending_chars += len(t)
                if len(pending) >= cfg.batch_docs or pending_chars >= BATCH_CHARS:
                    flush()
        flush()

    def finalize(self, inputs: list[Artifact], cfg: DedupConfig, directory: str, fs: Any) -> dict[str, Any]:
        bands, rows = cfg.lsh_shape()
        return {"lsh": {"bands": bands, "rows": rows, "num_perm": cfg.num_perm, "partitions": cfg.partitions}}


# --------------------------------------------------------------------------------------------------
# reduce: candidate pairs per partition


class DedupCandidatesStage(Stage):
    """Documents that share a band bucket (or the exact hash) become candidate pairs."""

    name = "dedup_candidates"
    version = 1
    Config = DedupConfig
    fields = {"partitions"}

    def fingerprint(self, cfg: DedupConfig, input_fingerprints: list[str]) -> str:
        return fingerprint(self.name, self.version, cfg.subset(self.fields), input_fingerprints)

    def plan(self, inputs: list[Artifact], cfg: DedupConfig) -> list[dict[str, Any]]:
        minhash = _one(inputs, "minhash")
        parts = minhash.manifest.get("lsh", {}).get("partitions", cfg.partitions)
        return [{"partition": k} for k in range(parts)]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: DedupConfig, out: ArtifactWriter) -> None:
        stats = out.stats
        minhash = _one(inputs, "minhash")
        name = f"p{unit['partition']:03d}"
        batches = list(minhash.iter_batches(table=name, batch_size=1 << 16)) if name in minhash.table_names() else []
        if not batches:
            return
        t = pa.Table.from_batches(batches, schema=BUCKET_SCHEMA)
        band = t.column("band").to_numpy()
        bucket = t.column("bucket").to_numpy()
        doc = t.column("doc").to_numpy()
        stats.rows_in = int(band.size)
        order = np.lexsort((doc, bucket, band))
        band, bucket, doc = band[order], bucket[order], doc[order]
        new_group = np.ones(band.size, bool)
        new_group[1:] = (band[1:] != band[:-1]) | (bucket[1:] != bucket[:-1])
        group_id = np.cumsum(new_group) - 1
        first_doc = doc[new_group][group_id]
        member = ~new_group & (doc != first_doc)
        a, b, exact = first_doc[member], doc[member], band[member] == EXACT_BAND
        if a.size:
            # one edge per pair; an exact match wins over a band match
            order = np.lexsort((~exact, b, a))
            a, b, exact = a[order], b[order], exact[order]
            first = np.ones(a.size, bool)
            first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
            a, b, exact = a[first], b[first], exact[first]
            out.write(pa.record_batch([a, b, exact], schema=EDGE_SCHEMA))
        out.count("buckets_shared", int(np.unique(group_id[member]).size))


# --------------------------------------------------------------------------------------------------
# verify + connected components


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


class DedupClustersStage(Stage):
    """Verify candidates by true Jaccard, union-find them into clusters, choose the survivors."""

    name = "dedup_clusters"
    version = 1
    Config = DedupConfig
    fields = {"exact", "near", "ngram", "threshold", "keep"}

    def fingerprint(self, cfg: DedupConfig, input_fingerprints: list[str]) -> str:
        return fingerprint(self.name, self.version, cfg.subset(self.fields), input_fingerprints)

    def plan(self, inputs: list[Artifact], cfg: DedupConfig) -> list[dict[str, Any]]:
        _one(inputs, "dedup_candidates")
        if not _documents(inputs, ("dedup_candidates",)):
            raise StageInputError("inputs", "dedup_clusters reads the documents as well as dedup_candidates")
        return [{"all": True}]

    def _load(
        self, keys: np.ndarray, docs: list[Artifact], cfg: DedupConfig, out: ArtifactWriter
    ) -> dict[int, dict[str, Any]]:
        """Shingle sets, exact hashes, lengths and ids of the candidate documents, one shard at a time."""
        info: dict[int, dict[str, Any]] = {}
        shard_of = keys >> _ROW_BITS
        for prefix in np.unique(shard_of):
            sel = keys[shard_of == prefix]
            inp, shard, _ = split_key(int(prefix) << _ROW_BITS)
            rows = (sel & ((1 << _ROW_BITS) - 1)).astype(np.int64)
            table = _read_shard(docs[inp], shard, ["id", "text"]).take(pa.array(rows))
            ids = table.column("id").to_pylist()
            texts = [_text_slice(t) for t in table.column("text").to_pylist()]
            norm = [normalise_for_dedup(t) for t in texts]
            batch = shingle_batch(norm, cfg.ngram)
            for j, key in enumerate(sel.tolist()):
                sh = np.unique(batch.hashes[batch.offsets[j] : batch.offsets[j + 1]])
                info[key] = {"id": ids[j], "exact": exact_hash(norm[j]), "len": len(texts[j]), "shingles": sh}
            out.count("candidate_docs_read", len(sel))
        return info

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: DedupConfig, out: ArtifactWriter) -> None:
        stats = out.stats
        cands = _one(inputs, "dedup_candidates")
        docs = _documents(inputs, ("dedup_candidates",))
        t = cands.read_table()
        if t.num_rows == 0:
            stats.extra.update(clusters=0, docs_removed=0)
            return
        a = t.column("a").to_numpy()
        b = t.column("b").to_numpy()
        exact = t.column("exact").to_numpy(zero_copy_only=False)
        # partitions found the same pair in several bands: one edge per pair, exact if any was
        order = np.lexsort((~exact, b, a))
        a, b, exact = a[order], b[order], exact[order]
        first = np.ones(a.size, bool)
        first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        a, b, exact = a[first], b[first], exact[first]
        stats.rows_in = int(a.size)
        info = self._load(np.unique(np.concatenate((a, b))), docs, cfg, out)

        uf = _UnionFind()
        linked: set[int] = set()
        rejected = []
        for x, y, ex in zip(a.tolist(), b.tolist(), exact.tolist()):
            ix, iy = info[x], info[y]
            if ex and ix["exact"] == iy["exact"]:
                uf.union(x, y)
                linked.update((x, y))
                stats.rows_out += 1
                continue
            j = jaccard_sorted_unique(ix["shingles"], iy["shingles"]) if cfg.near else 0.0
            if cfg.near and j >= cfg.threshold:
                uf.union(x, y)
                linked.update((x, y))
                stats.rows_out += 1
            else:
                rejected.append((iy["id"], ix["id"], j))
        if rejected:
            out.reject_batch(
                pa.RecordBatch.from_pydict(
                    {
                        "id": [r[0] for r in rejected],
                        "text": [None] * len(rejected),
                        "source": [None] * len(rejected),
                        "url": [None] * len(rejected),
                        "lang": [None] * len(rejected),
                        "meta": [None] * len(rejected),
                        "reason": ["below_threshold"] * len(rejected),
                        "detail": [
                            f"candidate pair with {o} has jaccard {j:.3f} < {cfg.threshold}" for _, o, j in rejected
                        ],
                    },
                    schema=REJECT_SCHEMA,
                )
            )

        clusters: dict[int, list[int]] = {}
        for key in sorted(linked):
            clusters.setdefault(uf.find(key), []).append(key)
        removal_rows: dict[str, list] = {n: [] for n in REMOVAL_SCHEMA.names}
        cluster_rows: dict[str, list] = {n: [] for n in CLUSTER_SCHEMA.names}
        reasons: Counter[str] = Counter()
        for members in clusters.values():
            # Survivor order: corpus order, or longest first. A member is removed only as the copy of
            # a survivor it matches at the threshold itself: a chain a~b~c with a !~ c keeps c, so no
            # removal is ever justified by similarity to a document that is gone.
            if cfg.keep == "longest":
                members.sort(key=lambda k: (-info[k]["len"], k))
            else:
                members.sort()
            survivors: list[int] = []
            copies: list[tuple[int, int, float]] = []
            for m in members:
                im = info[m]
                match, best = None, -1.0
                for k in survivors:
                    ik = info[k]
                    if im["exact"] == ik["exact"]:
                        match, best = k, 1.0
                        break
                    if cfg.near:
                        j = jaccard_sorted_unique(im["shingles"], ik["shingles"])
                        if j >= cfg.threshold and j > best:
                            match, best = k, j
                if match is None:
                    survivors.append(m)
                else:
                    copies.append((m, match, best))
            size = len(members)
            for kept in survivors:
                mine = [m for m, k, _ in copies if k == kept]
                if not mine:
                    continue
                cluster_rows["kept_doc"].append(kept)
                cluster_rows["kept_id"].append(info[kept]["id"])
                cluster_rows["size"].append(len(mine) + 1)
                cluster_rows["members"].append([info[kept]["id"]] + [info[m]["id"] for m in mine])
            for m, kept, j in copies:
                im, ik = info[m], info[kept]
                reason = "exact_duplicate" if im["exact"] == ik["exact"] else "near_duplicate"
                reasons[reason] += 1
                removal_rows["doc"].append(m)
                removal_rows["id"].append(im["id"])
                removal_rows["reason"].append(reason)
                removal_rows["kept_doc"].append(kept)
                removal_rows["kept_id"].append(ik["id"])
                removal_rows["jaccard"].append(j)
                removal_rows["cluster_size"].append(size)
        order = np.argsort(np.array(removal_rows["doc"], np.int64), kind="stable")
        removal = pa.RecordBatch.from_pydict(removal_rows, schema=REMOVAL_SCHEMA).take(pa.array(order))
        out.write(removal, count=False)  # rows out: the verified pairs
        out.table("clusters").write(pa.RecordBatch.from_pydict(cluster_rows, schema=CLUSTER_SCHEMA))
        stats.extra.update(
            components=len(clusters),
            clusters=len(cluster_rows["kept_doc"]),
            docs_removed=removal.num_rows,
            largest_cluster=max((len(m) for m in clusters.values()), default=0),
            **{f"removed_{k}": v for k, v in sorted(reasons.items())},
        )


# --------------------------------------------------------------------------------------------------
# filter


def _chain_store(docs: list[Artifact], cfg: DedupConfig) -> str:
    digest = hashlib.sha256(
        json.dumps([[a.fingerprint for a in docs], cfg.fingerprint_config()], sort_keys=True).encode()
    ).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "kiln-dedup-chain", digest)


def run_dedup_chain(docs: list[Artifact], cfg: DedupConfig, store: ArtifactStore) -> Artifact:
    """minhash -> dedup_candidates -> dedup_clusters in `store`; returns the clusters artifact."""
    from tasks.stage import run_in_store

    minhash = run_in_store(MinHashStage(), cfg, docs, store)
    cands = run_in_store(DedupCandidatesStage(), cfg, [minhash], store)
    return run_in_store(DedupClustersStage(), cfg, [cands, *docs], store)


class DedupStage(Stage):
    """Drop the documents the clusters artifact lists, as rejects naming the document kept instead."""

    name = "dedup"
    version = 1
    Config = DedupConfig
    balanced = True
    splittable = True

    def plan(self, inputs: list[Artifact], cfg: DedupConfig) -> list[dict[str, Any]]:
        docs = _documents(inputs, ("dedup_clusters",))
        if not docs:
            raise StageInputError("inputs", "dedup reads documents (and the dedup_clusters artifact)")
        found = [a for a in inputs if a.stage == "dedup_clusters"]
        if found:
            clusters = _one(inputs, "dedup_clusters")
        else:
            # Run on its own (`kiln stage dedup`): compute the chain first in a scratch store keyed by
            # the documents and config, so a rerun finds it committed.
            clusters = run_dedup_chain(docs, cfg, ArtifactStore(_chain_store(docs, cfg)))
        read = [i["fingerprint"] for i in clusters.manifest.get("inputs", []) if i["stage"] != "dedup_candidates"]
        if read != [a.fingerprint for a in docs]:
            raise StageInputError("inputs", "the dedup_clusters artifact was computed from other documents")
        return [
            {"input": i, "shard": s, "clusters": clusters.path}
            for i, a in enumerate(docs)
            for s in range(len(a.shards()))
        ]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: DedupConfig, out: ArtifactWriter) -> None:
        docs = _documents(inputs, ("dedup_clusters",))
        clusters = Artifact.open(unit["clusters"])
        prefix = doc_key(unit["input"], unit["shard"], 0) >> _ROW_BITS
        removed: dict[int, dict[str, Any]] = {}
        for batch in clusters.iter_batches(columns=["doc", "reason", "kept_id", "jaccard", "cluster_size"]):
            keys = batch.column(0).to_numpy()
            mask = (keys >> _ROW_BITS) == prefix
            if mask.any():
                for r in batch.filter(pa.array(mask)).to_pylist():
                    removed[r["doc"] & ((1 << _ROW_BITS) - 1)] = r
        row0 = unit_first_row(unit)
        for batch in read_unit(docs[unit["input"]], unit, stats=out.stats):
            n = batch.num_rows
            rows = np.arange(row0, row0 + n)
            drop = np.fromiter((r in removed for r in rows.tolist()), bool, n) if removed else np.zeros(n, bool)
            out.write(batch.filter(pa.array(~drop)))
            if drop.any():
                gone = batch.filter(pa.array(drop))
                info = [removed[r] for r in rows[drop].tolist()]
                texts = [
                    t if t is None or len(t) <= MAX_REJECT_TEXT_CHARS else t[:MAX_REJECT_TEXT_CHARS]
                    for t in gone.column("text").to_pylist()
                ]
                out.reject_batch(
                    pa.RecordBatch.from_pydict(
                        {
                            **{c: gone.column(c).to_pylist() for c in ("id", "source", "url", "lang", "meta")},
                            "text": texts,
                            "reason": [i["reason"] for i in info],
                            "detail": [
                                f"duplicate of {i['kept_id']} (jaccard {i['jaccard']:.3f}, "
                                f"cluster of {i['cluster_size']})"
                                for i in info
                            ],
                        },
                        schema=REJECT_SCHEMA,
                    )
                )
            row0 += n
