"""Exact and near-duplicate removal as four chained stages: map -> shuffle -> reduce -> filter.

    minhash           (map, one unit per document shard) shingles and MinHash signatures; writes one
                      row per (document, LSH band) -- and one per document for the exact hash -- into
                      tables p000..pNNN partitioned by bucket-hash prefix: that is the shuffle.
    dedup_candidates  (reduce, one unit per partition) documents sharing a bucket become candidate
                      pairs (each member linked to the bucket's first document).
    dedup_clusters    (one unit) candidate pairs verified by the true Jaccard of their shingle sets
                      (recomputed from the documents; only candidates are read), union-find over the
                      verified pairs into connected components; a document is removed only if it
                      matches, at the threshold, a kept document of its component; writes the removal
                      list, the verified pairs (`links`) and the clusters.
    dedup             (filter, one unit per document shard) drops the listed documents as rejects
                      with reason exact_duplicate / near_duplicate, naming the kept document.

Every phase is a content-addressed artifact, so each resumes on its own and its units spread over
Dask or Ray like any stage. A document is addressed by a 64-bit *key* (which document input, which
shard, which row), which is also the deterministic corpus order used to pick the survivor.

Growing corpora (keep: first). Documents are judged in corpus order, each against the documents before
it only: its component is the one its verified pairs with earlier documents make, and it goes if it
matches a document kept before it. So whether a document stays never depends on what comes after it:
documents added at the end of the corpus can remove each other, never one already kept. That is what
lets a run continue an earlier one: the minhash units of unchanged shards are copied (their buckets are
not recomputed), and dedup_clusters finds the artifact that judged the longest unchanged run of leading
shards (its unit key chains the shards' content), takes its removals and verified pairs as they are,
and judges only the documents after them -- reading the text of just the new candidates and the kept
documents they meet. The result is the one a run over the whole corpus from scratch gives.
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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.artifacts import Artifact, ArtifactStore, ArtifactWriter, fingerprint, read_unit, unit_first_row
from tasks.artifacts.paths import is_local
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
# every candidate pair as judged (a before b): linked when verified. A later run rebuilds the components of
# the documents judged before from it, without reading their texts again; the rejects are its unlinked rows.
PAIR_SCHEMA = pa.schema(
    [
        ("a", pa.int64()),
        ("b", pa.int64()),
        ("a_id", pa.string()),
        ("b_id", pa.string()),
        ("jaccard", pa.float64()),
        ("exact", pa.bool_()),  # the same normalised text
        ("linked", pa.bool_()),
    ]
)
PAIRS_TABLE = "pairs"


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


def _read_rows(artifact: Artifact, shard: int, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows `rows` (sorted) of one shard, reading only the row groups that hold them."""
    path = artifact.shards()[shard]
    with artifact.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.concatenate(([0], np.cumsum(sizes)))
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        table = pf.read_row_groups(groups.tolist(), columns=columns)
    # a row's place in what was read: its offset in its group plus the rows of the groups read before it
    read_before = np.concatenate(([0], np.cumsum([sizes[g] for g in groups])))
    at = read_before[np.searchsorted(groups, group_of)] + (rows - starts[group_of])
    return table.take(pa.array(at))


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

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: DedupConfig) -> str:
        """The shard's content and its place: the rows written name documents by input, shard and row, so
        a unit is copied where its shard is unchanged and in the same place (shards added after it)."""
        return self.shard_key(unit, inputs, cfg, config=cfg.subset(self.fields), whole=[], position=True)

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
    version = 2
    Config = DedupConfig
    fields = {"exact", "near", "ngram", "threshold", "keep"}
    # what decides which documents go, beside the documents themselves (the partitions do not)
    decisive = {"exact", "near", "ngram", "threshold", "keep", "num_perm", "bands", "rows", "seed"}

    def fingerprint(self, cfg: DedupConfig, input_fingerprints: list[str]) -> str:
        return fingerprint(self.name, self.version, cfg.subset(self.fields), input_fingerprints)

    def plan(self, inputs: list[Artifact], cfg: DedupConfig) -> list[dict[str, Any]]:
        _one(inputs, "dedup_candidates")
        if not _documents(inputs, ("dedup_candidates",)):
            raise StageInputError("inputs", "dedup_clusters reads the documents as well as dedup_candidates")
        return [{"all": True}]

    def prefix_keys(self, docs: list[Artifact], cfg: DedupConfig) -> list[tuple[str, int]]:
        """(key, first doc key after it) for every leading run of document shards: the key chains the
        settings and each shard's place and content, so it names what the judgement of the documents up
        to there depends on -- and nothing after them."""
        key = fingerprint(
            f"{self.name}.prefix",
            self.version,
            {"config": cfg.subset(self.decisive), "minhash": MinHashStage.version, "candidates": 1},
        )
        out = []
        for i, a in enumerate(docs):
            for s in range(len(a.shards())):
                key = fingerprint(
                    f"{self.name}.prefix", self.version, {"before": key, "at": [i, s], "shard": a.shard_digest(s)}
                )
                out.append((key, int(doc_key(i, s + 1, 0))))
        return out or [(key, 0)]

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: DedupConfig) -> str:
        return self.prefix_keys(_documents(inputs, ("dedup_candidates",)), cfg)[-1][0]

    def _load(
        self, keys: np.ndarray, docs: list[Artifact], cfg: DedupConfig, out: ArtifactWriter
    ) -> dict[int, dict[str, Any]]:
        """Shingle sets, exact hashes, lengths and ids of the candidate documents, one shard at a time."""
        info: dict[int, dict[str, Any]] = {}
        keys = np.unique(keys)
        shard_of = keys >> _ROW_BITS
        for prefix in np.unique(shard_of):
            sel = keys[shard_of == prefix]
            inp, shard, _ = split_key(int(prefix) << _ROW_BITS)
            rows = (sel & ((1 << _ROW_BITS) - 1)).astype(np.int64)
            table = _read_rows(docs[inp], shard, rows, ["id", "text"])
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
        cands = _one(inputs, "dedup_candidates")
        docs = _documents(inputs, ("dedup_candidates",))
        t = cands.read_table()
        a = t.column("a").to_numpy() if t.num_rows else np.zeros(0, np.int64)
        b = t.column("b").to_numpy() if t.num_rows else np.zeros(0, np.int64)
        exact = t.column("exact").to_numpy(zero_copy_only=False) if t.num_rows else np.zeros(0, bool)
        # partitions found the same pair in several bands: one edge per pair, exact if any was; in the order
        # the documents are judged (the later document of the pair, then the earlier)
        order = np.lexsort((~exact, a, b))
        a, b, exact = a[order], b[order], exact[order]
        first = np.ones(a.size, bool)
        first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        a, b, exact = a[first], b[first], exact[first]
        out.stats.rows_in = int(a.size)
        keys = self.prefix_keys(docs, cfg)
        judgement = _Judgement(self, docs, cfg, out)
        if cfg.keep == "first":
            out.prefixes = [k for k, _ in keys]  # a later run may continue after any of these
            judgement.in_order(a, b, exact, keys)
        else:
            judgement.by_length(a, b, exact)
        judgement.write()

    def _verify(self, ix: dict[str, Any], iy: dict[str, Any], ex: bool, cfg: DedupConfig) -> tuple[bool, float, bool]:
        """(linked, jaccard, same text) of a candidate pair."""
        if ex and ix["exact"] == iy["exact"]:
            return True, 1.0, True
        j = jaccard_sorted_unique(ix["shingles"], iy["shingles"]) if cfg.near else 0.0
        return bool(cfg.near and j >= cfg.threshold), j, False

    @staticmethod
    def _match(
        im: dict[str, Any], survivors: list[int], info: dict[int, dict[str, Any]], cfg: DedupConfig
    ) -> tuple[int | None, float, str]:
        """The kept document `im` copies: the first with its exact text, else the most similar at the
        threshold; (None, ...) if none."""
        match, best = None, -1.0
        for k in survivors:
            ik = info[k]
            if im["exact"] == ik["exact"]:
                return k, 1.0, "exact_duplicate"
            if cfg.near:
                j = jaccard_sorted_unique(im["shingles"], ik["shingles"])
                if j >= cfg.threshold and j > best:
                    match, best = k, j
        return match, best, "near_duplicate"


class _Judgement:
    """Which candidate documents go. keep: first -- in corpus order, each document against the kept
    documents of the component its verified pairs with earlier documents make (see the module's
    docstring), continuing an earlier artifact's judgement of the leading shards where one exists.
    keep: longest -- the whole components at once (a longer document later in the corpus displaces an
    earlier one), so that mode judges the whole corpus every time."""

    def __init__(self, stage: DedupClustersStage, docs: list[Artifact], cfg: DedupConfig, out: ArtifactWriter):
        self.stage, self.docs, self.cfg, self.out = stage, docs, cfg, out
        self.uf = _UnionFind()
        self.survivors: dict[int, list[int]] = {}  # root -> kept members, in corpus order
        self.size: dict[int, int] = {}  # root -> members
        self.removed: dict[int, int] = {}  # doc -> the kept document it copies
        self.ids: dict[int, str] = {}
        self.pairs: list[tuple[int, int, float, bool, bool]] = []  # (a, b, jaccard, same text, linked)
        self.removals: list[tuple[int, int, float, int, str]] = []  # (doc, kept, jaccard, cluster size, reason)

    def _register(self, x: int, judged: bool = True) -> None:
        """x joins the union-find: a kept survivor of its own component if judged already and not removed."""
        if x not in self.uf.parent:
            self.uf.parent[x] = x
            self.survivors[x] = [x] if judged and x not in self.removed else []
            self.size[x] = 1

    def _union(self, x: int, y: int) -> None:
        rx, ry = self.uf.find(x), self.uf.find(y)
        if rx == ry:
            return
        self.uf.union(rx, ry)
        root, other = (rx, ry) if self.uf.find(rx) == rx else (ry, rx)
        self.survivors[root] = sorted(self.survivors[root] + self.survivors.pop(other))
        self.size[root] += self.size.pop(other)

    def _earlier(self, keys: list[tuple[str, int]]) -> int:
        """Take the judgement of the leading shards from the earlier artifact that judged the most of them;
        returns the first doc key left to judge (0: none found)."""
        found = self.out.find_prefix([k for k, _ in reversed(keys)])
        if found is None:
            return 0
        where, _record, key = found
        fs = self.out.fs
        try:
            earlier = Artifact.open(where if is_local(fs) else fs.unstrip_protocol(where))
            removals = earlier.read_table() if earlier.num_rows else None
            pairs = earlier.read_table(table=PAIRS_TABLE) if earlier.table_rows(PAIRS_TABLE) else None
        except (FileNotFoundError, OSError):  # gone meanwhile (gc): judge everything
            return 0
        boundary = next(end for k, end in keys if k == key)
        if removals is not None:
            for r in removals.filter(pc.less(removals.column("doc"), boundary)).to_pylist():
                self.removed[r["doc"]] = r["kept_doc"]
                self.ids[r["doc"]], self.ids[r["kept_doc"]] = r["id"], r["kept_id"]
                self.removals.append((r["doc"], r["kept_doc"], r["jaccard"], r["cluster_size"], r["reason"]))
        if pairs is not None:
            pairs = pairs.filter(pc.less(pairs.column("b"), boundary))
            for x, y, x_id, y_id, j, same, linked in zip(*(pairs.column(c).to_pylist() for c in PAIR_SCHEMA.names)):
                self.ids[x], self.ids[y] = x_id, y_id
                self.pairs.append((x, y, j, same, linked))
                if linked:
                    self._register(x)
                    self._register(y)
                    self._union(x, y)
            # what this run did not redo: the pairs of the leading shards an earlier artifact judged
            self.out.count("pairs_judged_earlier", pairs.num_rows)
        self.out.stats.extra["continued_from"] = earlier.fingerprint
        return boundary

    def in_order(self, a: np.ndarray, b: np.ndarray, exact: np.ndarray, keys: list[tuple[str, int]]) -> None:
        cfg = self.cfg
        boundary = self._earlier(keys)
        new = b >= boundary
        na, nb, nex = a[new], b[new], exact[new]
        # what the new pairs need: their documents, and the kept documents of the components they reach
        need = [na, nb]
        for x in set(na[na < boundary].tolist()):
            if x in self.uf.parent:
                need.append(np.array(self.survivors[self.uf.find(x)], np.int64))
        info = self.stage._load(np.concatenate(need), self.docs, cfg, self.out) if na.size else {}
        self.ids.update((k, v["id"]) for k, v in info.items())
        i = 0
        while i < nb.size:
            y = int(nb[i])
            while i < nb.size and nb[i] == y:
                x = int(na[i])
                linked, j, same = self.stage._verify(info[x], info[y], bool(nex[i]), cfg)
                self.pairs.append((x, y, j, same, linked))
                if linked:
                    self._register(x)
                    self._register(y, judged=False)  # y is judged below, once all its pairs are in
                    self._union(x, y)
                i += 1
            if y not in self.uf.parent:
                continue  # no verified pair with an earlier document: kept, and nothing to compare
            root = self.uf.find(y)
            match, best, reason = self.stage._match(info[y], self.survivors[root], info, cfg)
            if match is None:
                self.survivors[root].append(y)  # the latest document so far: the list stays in corpus order
            else:
                self.removed[y] = match
                self.removals.append((y, match, best, self.size[root], reason))

    def by_length(self, a: np.ndarray, b: np.ndarray, exact: np.ndarray) -> None:
        cfg = self.cfg
        info = self.stage._load(np.concatenate((a, b)), self.docs, cfg, self.out) if a.size else {}
        self.ids.update((k, v["id"]) for k, v in info.items())
        for x, y, ex in zip(a.tolist(), b.tolist(), exact.tolist()):
            linked, j, same = self.stage._verify(info[x], info[y], ex, cfg)
            self.pairs.append((x, y, j, same, linked))
            if linked:
                self._register(x)
                self._register(y)
                self._union(x, y)
        clusters: dict[int, list[int]] = {}
        for key in sorted(self.uf.parent):
            clusters.setdefault(self.uf.find(key), []).append(key)
        for members in clusters.values():
            members.sort(key=lambda k: (-info[k]["len"], k))
            survivors: list[int] = []
            for m in members:
                match, best, reason = self.stage._match(info[m], survivors, info, cfg)
                if match is None:
                    survivors.append(m)
                else:
                    self.removals.append((m, match, best, len(members), reason))
        self.removals.sort()

    def write(self) -> None:
        """The removal list (data), the judged pairs, the pairs under the threshold (rejects) and the
        clusters, each in corpus order; and the counts."""
        out, cfg, ids = self.out, self.cfg, self.ids
        below = [(x, y, j) for x, y, j, _same, linked in self.pairs if not linked]
        if below:
            n = len(below)
            out.reject_batch(
                pa.RecordBatch.from_pydict(
                    {
                        "id": [ids[y] for _, y, _ in below],
                        **{c: [None] * n for c in ("text", "source", "url", "lang", "meta")},
                        "reason": ["below_threshold"] * n,
                        "detail": [
                            f"candidate pair with {ids[x]} has jaccard {j:.3f} < {cfg.threshold}" for x, _, j in below
                        ],
                    },
                    schema=REJECT_SCHEMA,
                )
            )
        reasons: Counter[str] = Counter(r[4] for r in self.removals)
        out.write(
            pa.RecordBatch.from_pydict(
                {
                    "doc": [r[0] for r in self.removals],
                    "id": [ids[r[0]] for r in self.removals],
                    "reason": [r[4] for r in self.removals],
                    "kept_doc": [r[1] for r in self.removals],
                    "kept_id": [ids[r[1]] for r in self.removals],
                    "jaccard": [r[2] for r in self.removals],
                    "cluster_size": [r[3] for r in self.removals],
                },
                schema=REMOVAL_SCHEMA,
            ),
            count=False,  # rows out: the verified pairs
        )
        cols = list(zip(*self.pairs)) if self.pairs else [[]] * 5
        out.table(PAIRS_TABLE).write(
            pa.RecordBatch.from_pydict(
                {
                    "a": cols[0],
                    "b": cols[1],
                    "a_id": [ids[x] for x in cols[0]],
                    "b_id": [ids[y] for y in cols[1]],
                    "jaccard": cols[2],
                    "exact": cols[3],
                    "linked": cols[4],
                },
                schema=PAIR_SCHEMA,
            )
        )
        copies: dict[int, list[int]] = {}
        for doc, kept, *_ in self.removals:
            copies.setdefault(kept, []).append(doc)
        kept_docs = sorted(copies)
        out.table("clusters").write(
            pa.RecordBatch.from_pydict(
                {
                    "kept_doc": kept_docs,
                    "kept_id": [ids[k] for k in kept_docs],
                    "size": [len(copies[k]) + 1 for k in kept_docs],
                    "members": [[ids[k]] + [ids[m] for m in copies[k]] for k in kept_docs],
                },
                schema=CLUSTER_SCHEMA,
            )
        )
        roots = {self.uf.find(x) for x in self.uf.parent}
        out.stats.rows_out = sum(1 for p in self.pairs if p[4])
        out.stats.extra.update(
            components=len(roots),
            clusters=len(kept_docs),
            docs_removed=len(self.removals),
            largest_cluster=max((self.size[r] for r in roots), default=0),
            **{f"removed_{k}": v for k, v in sorted(reasons.items())},
        )


def _removals_by_shard(clusters: Artifact) -> dict[int, str]:
    """First doc key of a shard -> a digest of the removal rows of its documents (row, reason, kept, ...)."""
    digests: dict[int, Any] = {}
    for batch in clusters.iter_batches(columns=["doc", "reason", "kept_id", "jaccard", "cluster_size"]):
        cols = [batch.column(c).to_pylist() for c in batch.schema.names]
        for doc, reason, kept_id, j, size in zip(*cols):
            start = doc >> _ROW_BITS << _ROW_BITS
            h = digests.get(start)
            if h is None:
                h = digests[start] = hashlib.sha256()
            h.update(json.dumps([doc - start, reason, kept_id, j, size]).encode())
    return {k: h.hexdigest()[:32] for k, h in digests.items()}


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
        removed = _removals_by_shard(clusters)
        return [
            {"input": i, "shard": s, "clusters": clusters.path, "removed": removed.get(int(doc_key(i, s, 0)), "")}
            for i, a in enumerate(docs)
            for s in range(len(a.shards()))
        ]

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: DedupConfig) -> str:
        """The shard's content and what is removed from it (a digest of its removal rows, placed by row): not
        the clusters artifact, which changes whenever the corpus grows, while a shard's removals do not."""
        return self.shard_key(unit, inputs, cfg, whole=[], removed=unit.get("removed"))

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
