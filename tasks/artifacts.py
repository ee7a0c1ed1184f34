"""The artifact store: content-addressed, immutable stage outputs.

An artifact is a directory `<root>/<stage>/<fingerprint>/` holding Parquet shards (`part-*.parquet`),
optionally rejected rows under `rejects/`, and `_manifest.json`. The fingerprint is a hash of what
determines the content (stage name and version, canonical config, input fingerprints), so it doubles as
the cache key: same inputs and config, same path.

Writing happens in a staging directory next to the final one. Work is split into *units* (a unit is a
slice of the input: one file, one shard); each unit's shards count only once its marker
`_units/<n>.json` exists, so a killed stage resumes at the first unfinished unit. The commit writes
the manifest and renames the staging directory into place, so a crash never leaves a half artifact
that looks whole. On object stores (any fsspec URL without atomic rename) the data is moved first and
the manifest written last: an artifact exists if and only if its manifest does.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "_manifest.json"
UNITS_DIR = "_units"
NO_REUSE = "no-reuse"  # in UNITS_DIR: this artifact copies no unit from earlier ones (a refresh)
SCRATCH_DIR = "_scratch"
DATA_TABLE = "data"  # stored at the artifact's top level
REJECTS_DIR = "rejects"
FINGERPRINT_CHARS = 20


_UNIT_INDEX_CACHE: dict[tuple[str, Any, str], dict[str, dict[str, Any]]] = {}


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or not what the caller expects."""


# --------------------------------------------------------------------------------------------------
# fingerprints


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace: equal values give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(stage: str, version: int, config: Any, inputs: Sequence[str] = (), sources: Any = None) -> str:
    """hash(stage, stage version, canonical config, input fingerprints[, outside-world identity]).

    `sources` identifies what a stage reads from outside the store (files and their sizes and mtimes
    for ingest), so a changed input file is a changed fingerprint.
    """
    payload = {"stage": stage, "version": version, "config": config, "inputs": list(inputs)}
    if sources is not None:
        payload["sources"] = sources
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_CHARS]


# --------------------------------------------------------------------------------------------------
# stats


@dataclass
class StageStats:
    """What a stage did. rows_in == rows_out + sum(rejected) for every filter."""

    rows_in: int = 0
    rows_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def merge(self, other: StageStats) -> StageStats:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        for k, v in other.rejected.items():
            self.reject(k, v)
        for k, v in other.extra.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(self.extra.get(k, 0), (int, float)):
                self.extra[k] = self.extra.get(k, 0) + v
            else:
                self.extra.setdefault(k, v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_rejected": self.rows_rejected,
            "rejected": dict(sorted(self.rejected.items())),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStats:
        return cls(
            rows_in=d.get("rows_in", 0),
            rows_out=d.get("rows_out", 0),
            rejected=dict(d.get("rejected", {})),
            bytes_in=d.get("bytes_in", 0),
            bytes_out=d.get("bytes_out", 0),
            seconds=d.get("seconds", 0.0),
            extra=dict(d.get("extra", {})),
        )


# --------------------------------------------------------------------------------------------------
# reading


def _fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def _join(fs: fsspec.AbstractFileSystem, base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if not isinstance(fs, LocalFileSystem) else os.path.join(base, *parts)


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as a URL the user can pass back to Kiln (local paths stay plain paths)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


@dataclass
class Artifact:
    """A committed artifact, opened for reading."""

    path: str  # a local path or an fsspec URL
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str) -> Artifact:
        fs, p = _fs_and_path(path)
        mpath = _join(fs, p, MANIFEST)
        if not fs.exists(mpath):
            if fs.exists(p):
                raise ArtifactError(f"{path} is not a committed artifact (no {MANIFEST}); it may be half-written")
            raise ArtifactError(f"no artifact at {path}")
        with fs.open(mpath, "r") as f:
            return cls(path=path, manifest=json.load(f))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return _fs_and_path(self.path)[0]

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
        fs, p = _fs_and_path(self.path)
        base = p if table == DATA_TABLE else _join(fs, p, table)
        names = self.manifest.get("tables", {}).get(table, {}).get("shards", [])
        return [_join(fs, base, name) for name in names]

    def iter_batches(
        self, columns: list[str] | None = None, batch_size: int = 8192, table: str = "data"
    ) -> Iterator[pa.RecordBatch]:
        """Stream the artifact's rows shard by shard; memory is bounded by one batch."""
        fs = self.fs
        for shard in self.shards(table):
            with fs.open(shard, "rb") as f:
                pf = pq.ParquetFile(f)
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def read_table(self, columns: list[str] | None = None, table: str = "data") -> pa.Table:
        """The whole table in memory: for tests and small artifacts only."""
        batches = list(self.iter_batches(columns=columns, table=table))
        if batches:
            return pa.Table.from_batches(batches)
        schema = self.manifest.get("tables", {}).get(table, {}).get("schema")
        if schema:
            fields = [pa.field(n, pa.string()) for n in schema]
            return pa.Table.from_batches([], schema=pa.schema(fields))
        return pa.table({})

    def head(self, n: int = 5, table: str = "data") -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for batch in self.iter_batches(batch_size=max(n, 1), table=table):
            rows.extend(batch.slice(0, n - len(rows)).to_pylist())
            if len(rows) >= n:
                break
        return rows

    def ref(self) -> dict[str, Any]:
        """What flows pass between tasks: small, JSON-serialisable."""
        return {"stage": self.stage, "fingerprint": self.fingerprint, "path": self.path, "rows": self.num_rows}


# --------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Writes one table of an artifact as Parquet shards, rolling to a new shard at a size limit."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        directory: str,
        prefix: str,
        max_rows: int,
        max_bytes: int,
        compression: str = "zstd",
    ):
        self.fs = fs
        self.directory = directory
        self.prefix = prefix
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.compression = compression
        self.shards: list[str] = []
        self.rows = 0
        self.bytes = 0  # uncompressed Arrow bytes written
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._file = None
        self._shard_rows = 0
        self._shard_bytes = 0

    def _open(self, schema: pa.Schema) -> None:
        name = f"{self.prefix}-{len(self.shards):04d}.parquet"
        self.fs.makedirs(self.directory, exist_ok=True)
        self._file = self.fs.open(_join(self.fs, self.directory, name), "wb")
        self._writer = pq.ParquetWriter(self._file, schema, compression=self.compression)
        self.shards.append(name)
        self._shard_rows = 0
        self._shard_bytes = 0

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        if data.num_rows == 0:
            return
        if self.schema is None:
            self.schema = data.schema
        elif not data.schema.equals(self.schema):
            data = data.cast(self.schema)
        offset = 0
        while offset < data.num_rows:
            if self._writer is None:
                self._open(self.schema)
            room = self.max_rows - self._shard_rows
            piece = data.slice(offset, room)
            self._writer.write(piece if isinstance(piece, pa.Table) else pa.Table.from_batches([piece]))
            offset += piece.num_rows
            self._shard_rows += piece.num_rows
            self._shard_bytes += piece.nbytes
            self.rows += piece.num_rows
            self.bytes += piece.nbytes
            if self._shard_rows >= self.max_rows or self._shard_bytes >= self.max_bytes:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = None
            self._file = None

    def close(self) -> None:
        self._close_shard()


class ArtifactWriter:
    """What a stage writes one unit of work through: kept rows with `write`, dropped rows with `reject`,
    other named tables (e.g. `validation`) with `table(name).write`.

    Shards are named after the unit (`part-<unit>-<n>.parquet`), so the finished artifact's layout and
    row order do not depend on which worker ran which unit, or when. `scratch` is a directory that
    survives a killed attempt at the unit (a crawl keeps its frontier there) and is dropped at commit;
    it is None on stores that are not local.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        directory: str,
        unit: int,
        shard_rows: int = 100_000,
        shard_bytes: int = 128 << 20,
        on_rows: Any = None,
        scratch: str | None = None,
        on_progress: Any = None,
    ):
        self.fs = fs
        self.directory = directory
        self.unit = unit
        self._on_progress = on_progress
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.scratch = scratch
        self.tables: dict[str, ShardWriter] = {}
        self.data = self.table(DATA_TABLE)
        self.rejects = self.table(REJECTS_DIR)
        self._on_rows = on_rows

    def table(self, name: str) -> ShardWriter:
        if name not in self.tables:
            if name != DATA_TABLE and not name.replace("_", "").replace("-", "").isalnum():
                raise ArtifactError(f"bad table name {name!r}")
            directory = self.directory if name == DATA_TABLE else _join(self.fs, self.directory, name)
            self.tables[name] = ShardWriter(self.fs, directory, f"part-{self.unit:05d}", self.shard_rows, self.shard_bytes)
        return self.tables[name]

    def write(self, data: pa.RecordBatch | pa.Table | None) -> None:
        if data is not None:
            self.data.write(data)
            if self._on_rows:
                self._on_rows(data.num_rows)

    def reject(self, data: pa.RecordBatch | pa.Table | None) -> None:
        if data is not None:
            if "reason" not in data.schema.names:
                raise ArtifactError("rejected rows need a 'reason' column")
            self.rejects.write(data)
            if self._on_rows:
                self._on_rows(data.num_rows)

    def progress(self, fraction: float, note: str = "") -> None:
        """Report how far a long unit has got (training steps, crawled pages); Prefect shows it live."""
        if self._on_progress:
            self._on_progress(max(0.0, min(1.0, fraction)), note)

    def close(self) -> None:
        for t in self.tables.values():
            t.close()

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"shards": t.shards, "rows": t.rows, "bytes": t.bytes, "schema": t.schema.names if t.schema else None}
            for name, t in self.tables.items()
        }


class Staging:
    """The staging directory where one artifact is assembled, unit by unit, before its commit."""

    def __init__(self, fs: fsspec.AbstractFileSystem, staging_dir: str, final_dir: str, shard_rows: int, shard_bytes: int):
        self.fs = fs
        self.dir = staging_dir
        self.final_dir = final_dir
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.reuse_units = True  # look for keyed units in the other artifacts of this stage

    def _marker(self, unit: int) -> str:
        return _join(self.fs, self.dir, UNITS_DIR, f"{unit:05d}.json")

    def unit_result(self, unit: int) -> dict[str, Any] | None:
        """The recorded result of a finished unit, or None if it has to (re)run."""
        marker = self._marker(unit)
        if not self.fs.exists(marker):
            return None
        with self.fs.open(marker, "r") as f:
            return json.load(f)

    def begin_unit(self, unit: int, on_rows: Any = None, on_progress: Any = None) -> ArtifactWriter:
        """Clear the shards a killed attempt at this unit left behind (not its scratch), return its writer."""
        if self.fs.exists(self.dir):
            pattern = f"part-{unit:05d}-*.parquet"
            for path in self.fs.glob(_join(self.fs, self.dir, pattern)) + self.fs.glob(_join(self.fs, self.dir, "*", pattern)):
                self.fs.rm(path)
        self.fs.makedirs(self.dir, exist_ok=True)
        scratch = None
        if isinstance(self.fs, LocalFileSystem):
            scratch = _join(self.fs, self.dir, SCRATCH_DIR, f"{unit:05d}")
            os.makedirs(scratch, exist_ok=True)
        return ArtifactWriter(self.fs, self.dir, unit, self.shard_rows, self.shard_bytes, on_rows, scratch, on_progress)

    def finish_unit(self, unit: int, writer: ArtifactWriter, stats: StageStats, key: str | None = None) -> dict[str, Any]:
        writer.close()
        result = {"unit": unit, "stats": stats.to_dict(), "tables": writer.summary()}
        if key is not None:
            result["key"] = key
        return self._write_marker(unit, result)

    def _write_marker(self, unit: int, result: dict[str, Any]) -> dict[str, Any]:
        marker = self._marker(unit)
        self.fs.makedirs(_join(self.fs, self.dir, UNITS_DIR), exist_ok=True)
        tmp = marker + f".tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "w") as f:
            json.dump(result, f)
        self.fs.mv(tmp, marker)
        return result

    def find_unit(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """A unit with this key in another committed artifact of the same stage: (its directory, its
        record). Only stages that give their units keys (Stage.unit_key) record them."""
        parent = self.final_dir.rstrip("/").rsplit("/", 1)[0] if not isinstance(self.fs, LocalFileSystem) \
            else os.path.dirname(self.final_dir)
        if not self.fs.exists(parent):
            return None
        for entry in sorted(self.fs.ls(parent, detail=False), reverse=True):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or ".trash-" in name or entry.rstrip("/") == self.final_dir.rstrip("/"):
                continue
            record = self._unit_index(_join(self.fs, entry, MANIFEST)).get(key)
            if record is not None:
                return entry, record
        return None

    def _unit_index(self, manifest_path: str) -> dict[str, dict[str, Any]]:
        """key -> unit record of one committed artifact; parsed once per manifest version (artifacts are
        immutable; a refreshed one has a new manifest, so size and mtime are part of the cache key)."""
        try:
            info = self.fs.info(manifest_path)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        modified = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        stamp = (self.fs.unstrip_protocol(manifest_path), info.get("size"), str(modified))
        index = _UNIT_INDEX_CACHE.get(stamp)
        if index is None:
            try:
                with self.fs.open(manifest_path, "r") as f:
                    manifest = json.load(f)
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                return {}
            index = {r["key"]: r for r in manifest.get("unit_results", ()) if r.get("key")}
            if len(_UNIT_INDEX_CACHE) > 256:
                _UNIT_INDEX_CACHE.clear()
            _UNIT_INDEX_CACHE[stamp] = index
        return index

    def adopt_unit(self, unit: int, key: str) -> dict[str, Any] | None:
        """Copy a unit with the same key from another committed artifact instead of recomputing it; None
        if there is none. The copies are made before the marker, so a killed copy is simply redone."""
        reuse = self.reuse_units and not self.fs.exists(_join(self.fs, self.dir, UNITS_DIR, NO_REUSE))
        found = self.find_unit(key) if reuse else None
        if found is None:
            return None
        src_dir, record = found
        old_prefix, new_prefix = f"part-{record['unit']:05d}-", f"part-{unit:05d}-"
        self.begin_unit(unit)  # clears what a killed attempt at this unit left
        tables: dict[str, Any] = {}
        try:
            for name, table in record["tables"].items():
                src_base = src_dir if name == DATA_TABLE else _join(self.fs, src_dir, name)
                dst_base = self.dir if name == DATA_TABLE else _join(self.fs, self.dir, name)
                if table["shards"]:
                    self.fs.makedirs(dst_base, exist_ok=True)
                shards = []
                for shard in table["shards"]:
                    renamed = new_prefix + shard[len(old_prefix):] if shard.startswith(old_prefix) else shard
                    self.fs.copy(_join(self.fs, src_base, shard), _join(self.fs, dst_base, renamed))
                    shards.append(renamed)
                tables[name] = {**table, "shards": shards}
        except FileNotFoundError:  # the source artifact went away meanwhile (gc, a refresh): recompute
            self.begin_unit(unit)
            return None
        result = {"unit": unit, "stats": record["stats"], "tables": tables, "key": key,
                  "reused_from": src_dir.rstrip("/").rsplit("/", 1)[-1]}
        return self._write_marker(unit, result)

    def commit(self, manifest: dict[str, Any], n_units: int, finalize: Any = None) -> Artifact:
        """Assemble the manifest from the unit markers and move the artifact into place.

        `finalize(directory, fs)`, if given, runs on the complete staging directory just before the
        commit (to add files such as a Hugging Face dataset or a tokenizer) and returns manifest fields.
        """
        units = []
        for i in range(n_units):
            r = self.unit_result(i)
            if r is None:
                raise ArtifactError(f"cannot commit {self.final_dir}: unit {i} of {n_units} has not finished")
            units.append(r)
        stats = StageStats()
        for r in units:
            stats.merge(StageStats.from_dict(r["stats"]))
        names = sorted({n for r in units for n in r["tables"]} | {DATA_TABLE, REJECTS_DIR})
        tables = {}
        for name in names:
            parts = [r["tables"][name] for r in units if name in r["tables"]]
            tables[name] = {
                "rows": sum(p["rows"] for p in parts),
                "bytes": sum(p["bytes"] for p in parts),
                "shards": [s for p in parts for s in p["shards"]],
                "schema": next((p["schema"] for p in parts if p["schema"]), None),
            }
        manifest = dict(manifest)
        if any(r.get("key") for r in units):  # units another artifact of this stage may reuse
            manifest["unit_results"] = [
                {k: r[k] for k in ("unit", "key", "stats", "tables", "reused_from") if k in r} for r in units
            ]
        manifest.update(
            rows=tables[DATA_TABLE]["rows"],
            bytes=tables[DATA_TABLE]["bytes"],
            shards=tables[DATA_TABLE]["shards"],
            schema=tables[DATA_TABLE]["schema"],
            rejects_rows=tables[REJECTS_DIR]["rows"],
            tables=tables,
            units=n_units,
            stats=stats.to_dict(),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        self.fs.makedirs(self.dir, exist_ok=True)
        if finalize is not None:  # before the unit markers go, so a failed finalize can simply be retried
            manifest.update(finalize(self.dir, self.fs) or {})
        for leftover in (UNITS_DIR, SCRATCH_DIR):
            path = _join(self.fs, self.dir, leftover)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        body = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False)
        final_manifest = _join(self.fs, self.final_dir, MANIFEST)

        if isinstance(self.fs, LocalFileSystem):
            with open(_join(self.fs, self.dir, MANIFEST), "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.makedirs(os.path.dirname(self.final_dir), exist_ok=True)
            trash = None
            if os.path.exists(self.final_dir):  # a refresh replaces the old artifact
                trash = f"{self.final_dir}.trash-{uuid.uuid4().hex[:8]}"
                os.rename(self.final_dir, trash)
            try:
                os.rename(self.dir, self.final_dir)
            except OSError:
                if os.path.exists(final_manifest):  # another writer committed the same fingerprint first
                    self.fs.rm(self.dir, recursive=True)
                else:
                    raise
            if trash:
                self.fs.rm(trash, recursive=True)
        else:
            if self.fs.exists(self.final_dir):
                self.fs.rm(self.final_dir, recursive=True)
            if self.fs.exists(self.dir):
                self.fs.mv(self.dir, self.final_dir, recursive=True)
            with self.fs.open(final_manifest, "w") as f:  # last: the manifest is the commit
                f.write(body)
        return Artifact(path=_unstrip(self.fs, self.final_dir), manifest=manifest)

    def discard(self) -> None:
        if self.fs.exists(self.dir):
            self.fs.rm(self.dir, recursive=True)

    def recompute_all(self) -> None:
        """A refresh: start over, and copy no unit from earlier artifacts either (the flag lives in the
        staging directory, so unit tasks in other processes see it, and goes away with the commit)."""
        self.discard()
        self.fs.makedirs(_join(self.fs, self.dir, UNITS_DIR), exist_ok=True)
        with self.fs.open(_join(self.fs, self.dir, UNITS_DIR, NO_REUSE), "w") as f:
            f.write("refresh: every unit is recomputed\n")


class ArtifactStore:
    """A root directory (local path or fsspec URL) of artifacts laid out as `<stage>/<fingerprint>/`."""

    def __init__(self, root: str, shard_rows: int = 100_000, shard_bytes: int = 128 << 20):
        self.root = root
        self.fs, base = _fs_and_path(root)
        self.base = os.path.abspath(base) if isinstance(self.fs, LocalFileSystem) else base
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def _dir(self, stage: str, fp: str) -> str:
        return _join(self.fs, self.base, stage, fp)

    def path(self, stage: str, fp: str) -> str:
        return _unstrip(self.fs, self._dir(stage, fp))

    def is_committed(self, stage: str, fp: str) -> bool:
        return self.fs.exists(_join(self.fs, self._dir(stage, fp), MANIFEST))

    def open(self, stage: str, fp: str) -> Artifact:
        return Artifact.open(self.path(stage, fp))

    def staging(self, stage: str, fp: str) -> Staging:
        # Deterministic name: a rerun after a crash finds the finished units of the attempt before it.
        staging_dir = _join(self.fs, self.base, stage, f".staging-{fp}")
        return Staging(self.fs, staging_dir, self._dir(stage, fp), self.shard_rows, self.shard_bytes)

    def committed(self) -> Iterator[tuple[str, str, str]]:
        """(stage, fingerprint, path) of every committed artifact."""
        if not self.fs.exists(self.base):
            return
        for stage_dir in sorted(self.fs.ls(self.base, detail=False)):
            stage = stage_dir.rstrip("/").rsplit("/", 1)[-1]
            if stage.startswith(("_", ".")) or not self.fs.isdir(stage_dir):
                continue
            for entry in sorted(self.fs.ls(stage_dir, detail=False)):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if not name.startswith(".") and self.fs.exists(_join(self.fs, entry, MANIFEST)):
                    yield stage, name, _unstrip(self.fs, entry)

    def leftovers(self) -> Iterator[str]:
        """Staging and trash directories: unfinished or abandoned writes."""
        if not self.fs.exists(self.base):
            return
        for stage_dir in sorted(self.fs.ls(self.base, detail=False)):
            if not self.fs.isdir(stage_dir):
                continue
            for entry in sorted(self.fs.ls(stage_dir, detail=False)):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith(".staging-") or ".trash-" in name:
                    yield _unstrip(self.fs, entry)

    def remove(self, path: str) -> None:
        fs, p = _fs_and_path(path)
        fs.rm(p, recursive=True)


def staging_for_directory(out_dir: str, shard_rows: int = 100_000, shard_bytes: int = 128 << 20) -> Staging:
    """A staging area whose commit lands at an explicit directory (`kiln stage ... --output DIR`)."""
    fs, final = _fs_and_path(out_dir)
    if isinstance(fs, LocalFileSystem):
        final = os.path.abspath(final)
    parent, name = final.rsplit("/", 1) if "/" in final else ("", final)
    staging_dir = _join(fs, parent, f".{name}.staging") if parent else f".{name}.staging"
    staging = Staging(fs, staging_dir, final, shard_rows, shard_bytes)
    staging.reuse_units = False  # DIR's siblings are not a store's artifacts of one stage
    return staging
