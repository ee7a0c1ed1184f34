"""Reading committed artifacts: the manifest, tables, and one unit's slice of a shard."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts.paths import DATA_TABLE, MANIFEST, ArtifactError, fs_and_path, join
from tasks.artifacts.stats import StageStats


@dataclass
class Artifact:
    """A committed artifact, opened for reading. `slot` names the input it fills for the stage that
    reads it (`pack`, `model`, ...), when a planner said so."""

    path: str  # a local path or an fsspec URL
    manifest: dict[str, Any]
    slot: str | None = None

    @classmethod
    def open(cls, path: str, slot: str | None = None) -> Artifact:
        fs, p = fs_and_path(path)
        mpath = join(fs, p, MANIFEST)
        if not fs.exists(mpath):
            if fs.exists(p):
                raise ArtifactError(f"{path} is not a committed artifact (no {MANIFEST}); it may be half-written")
            raise ArtifactError(f"no artifact at {path}")
        with fs.open(mpath, "r") as f:
            return cls(path=path, manifest=json.load(f), slot=slot)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fs_and_path(self.path)[0]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def num_rows(self) -> int:
        return int(self.manifest.get("rows", 0))

    @property
    def stats(self) -> StageStats:
        return StageStats.from_dict(self.manifest.get("stats", {}))

    def table_names(self) -> list[str]:
        return sorted(self.manifest.get("tables", {}))

    def table_rows(self, table: str = DATA_TABLE) -> int:
        return int(self.manifest.get("tables", {}).get(table, {}).get("rows", 0))

    def shards(self, table: str = DATA_TABLE) -> list[str]:
        fs, p = fs_and_path(self.path)
        base = p if table == DATA_TABLE else join(fs, p, table)
        names = self.manifest.get("tables", {}).get(table, {}).get("shards", [])
        return [join(fs, base, name) for name in names]

    def shard_rows(self, table: str = DATA_TABLE) -> list[int]:
        """Rows per shard: from the manifest, or (artifacts committed before it recorded them) from
        the Parquet footers."""
        recorded = self.manifest.get("tables", {}).get(table, {}).get("shard_rows")
        if recorded is not None:
            return [int(n) for n in recorded]
        fs = self.fs
        counts = []
        for shard in self.shards(table):
            with fs.open(shard, "rb") as f:
                counts.append(pq.ParquetFile(f).metadata.num_rows)
        return counts

    def shard_digest(self, shard: int, table: str = DATA_TABLE) -> str:
        """The content identity of one shard (see write.shard_digest): as recorded when it was written,
        or computed from the file (artifacts written before digests were recorded, object stores)."""
        recorded = self.manifest.get("tables", {}).get(table, {}).get("digests")
        if recorded and recorded[shard]:
            return recorded[shard]
        cache = self.__dict__.setdefault("_digests", {})
        if (table, shard) not in cache:
            from tasks.artifacts.write import shard_digest

            cache[(table, shard)] = shard_digest(self.fs, self.shards(table)[shard])
        return cache[(table, shard)]

    def iter_batches(
        self, columns: list[str] | None = None, batch_size: int = 8192, table: str = DATA_TABLE
    ) -> Iterator[pa.RecordBatch]:
        """Stream the artifact's rows shard by shard; memory is bounded by one batch."""
        fs = self.fs
        for shard in self.shards(table):
            with fs.open(shard, "rb") as f:
                pf = pq.ParquetFile(f)
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def read_table(self, columns: list[str] | None = None, table: str = DATA_TABLE) -> pa.Table:
        """The whole table in memory: for tests and small artifacts only."""
        batches = list(self.iter_batches(columns=columns, table=table))
        if batches:
            return pa.Table.from_batches(batches)
        schema = self.manifest.get("tables", {}).get(table, {}).get("schema")
        if schema:
            fields = [pa.field(n, pa.string()) for n in schema if columns is None or n in columns]
            return pa.Table.from_batches([], schema=pa.schema(fields))
        return pa.table({})

    def head(self, n: int = 5, table: str = DATA_TABLE) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for batch in self.iter_batches(batch_size=max(n, 1), table=table):
            rows.extend(batch.slice(0, n - len(rows)).to_pylist())
            if len(rows) >= n:
                break
        return rows

    def reuse(self) -> dict[str, Any]:
        """What this artifact took from earlier ones instead of computing it: units copied (how many, of
        how many, from which artifacts) and, for a stage that judges in order, the artifact it continued."""
        records = self.manifest.get("unit_results", ())
        origins: dict[str, int] = {}
        for r in records:
            if r.get("reused_from"):
                origins[r["reused_from"]] = origins.get(r["reused_from"], 0) + 1
        out: dict[str, Any] = {"units": int(self.manifest.get("units", 0)), "copied": sum(origins.values())}
        out["from"] = dict(sorted(origins.items(), key=lambda kv: -kv[1]))
        continued = self.manifest.get("stats", {}).get("extra", {}).get("continued_from")
        if continued:
            out["continued_from"] = continued
        return out

    def reuse_note(self) -> str:
        """reuse() in words, or "" when nothing was taken from an earlier artifact."""
        r = self.reuse()
        parts = []
        if r["copied"]:
            origins = ", ".join(f"{fp} ({n})" for fp, n in r["from"].items())
            parts.append(f"{r['copied']} of {r['units']} units copied from {origins}")
        if r.get("continued_from"):
            parts.append(f"continued the judgement of {r['continued_from']}")
        return "; ".join(parts)

    def ref(self) -> dict[str, Any]:
        """What flows pass between tasks: small, JSON-serialisable."""
        return {"stage": self.stage, "fingerprint": self.fingerprint, "path": self.path, "rows": self.num_rows}


def pick(inputs: list[Artifact], slot: str, kinds: tuple[str, ...] = ()) -> Artifact | None:
    """The input filling `slot`: named so by the planner, or else the first of one of `kinds`."""
    for a in inputs:
        if a.slot == slot:
            return a
    if any(a.slot for a in inputs):
        return None
    for a in inputs:
        if a.stage in (kinds or (slot,)):
            return a
    return None


def read_unit(
    artifact: Artifact,
    unit: dict[str, Any],
    columns: list[str] | None = None,
    batch_rows: int = 2048,
    stats: StageStats | None = None,
    table: str = DATA_TABLE,
) -> Iterator[pa.RecordBatch]:
    """The rows of one unit: shard `unit["shard"]` of the table, limited to `unit["rows"] = [lo, hi)`
    when the unit is a slice of a shard. Only the row groups that overlap the slice are read. Rows and
    (Arrow) bytes read are counted into `stats`."""
    path = artifact.shards(table)[unit["shard"]]
    lo, hi = unit.get("rows") or (0, None)
    with artifact.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, start, pos = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start + n > lo and (hi is None or start < hi):
                groups.append(g)
                pos = start if pos is None else pos
            start += n
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            first = max(lo - pos, 0)
            last = batch.num_rows if hi is None else min(batch.num_rows, hi - pos)
            pos += batch.num_rows
            if last <= first:
                continue
            if first or last < batch.num_rows:
                batch = batch.slice(first, last - first)
            if stats is not None:
                stats.rows_in += batch.num_rows
                stats.bytes_in += batch.nbytes
            yield batch


def unit_first_row(unit: dict[str, Any]) -> int:
    """The shard row number of a unit's first row (0 unless the unit is a slice)."""
    return int((unit.get("rows") or (0, None))[0])
