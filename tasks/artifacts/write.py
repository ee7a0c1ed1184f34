"""Writing one unit of an artifact: kept rows, rejected rows (with a reason), other named tables.

The writer owns the unit's stats: `write` counts rows out, `reject` counts a row rejected by reason,
and the shared reader (`read_unit`) counts rows in, so a stage that keeps or drops what it reads has
rows_in == rows_out + rows_rejected by construction (the runner checks it at the end of the unit).
"""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts.paths import DATA_TABLE, REJECTS_DIR, ArtifactError, is_local, join
from tasks.artifacts.stats import StageStats

# A rejected row keeps whatever could be recovered of the record plus why it was dropped.
REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source", pa.string()),
        pa.field("url", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)

# Rejected raw input is kept for inspection, but a 50 MB garbage line should not be copied whole.
MAX_REJECT_TEXT_CHARS = 65_536
REJECT_BATCH_ROWS = 1024

# Content-defined shard ends (sources): once a shard holds 1/CUT_FRACTION of the shard size (the store's
# shard_rows), it ends after a row whose cut column hashes to 0 modulo that same number, or at the end of
# an item (a file). So shards average about 1/8 of shard_rows, and where one ends depends on the rows
# around the end, not on their count from the start: a document added in the middle changes one shard,
# one added at the end none of the earlier ones, and the stages downstream copy the units of the
# unchanged shards.
CUT_FRACTION = 16
# ... and such a shard is written in row groups of this many rows counted from its first row, so that its
# bytes (its digest) follow from its rows alone, not from how the rows arrived in batches.
CUT_ROW_GROUP = 1_024


def shard_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The content identity of a shard file: sha256 of its bytes (128 bits, hex)."""
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def _cut_hashes(values: list[Any]) -> list[int]:
    return [
        int.from_bytes(hashlib.blake2b(str(v).encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        for v in values
    ]


class RowBatcher:
    """Accumulates rows as columns and hands out Arrow batches of a bounded size."""

    def __init__(self, schema: pa.Schema, batch_rows: int = 2048):
        self.schema = schema
        self.batch_rows = batch_rows
        self._cols: dict[str, list] = {name: [] for name in schema.names}

    def __len__(self) -> int:
        return len(self._cols[self.schema.names[0]])

    def add(self, **row: Any) -> pa.RecordBatch | None:
        for name in self.schema.names:
            self._cols[name].append(row.get(name))
        return self.flush() if len(self) >= self.batch_rows else None

    def flush(self) -> pa.RecordBatch | None:
        if not len(self):
            return None
        batch = pa.RecordBatch.from_pydict(self._cols, schema=self.schema)
        self._cols = {name: [] for name in self.schema.names}
        return batch


class ShardWriter:
    """Writes one table of an artifact as Parquet shards, rolling to a new shard at a size limit.

    `cut_on` (a column) makes the shard ends content-defined (see CUT_FRACTION); `digests` records each
    shard's content identity when the store is local (Artifact.shard_digest computes it otherwise)."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        directory: str,
        prefix: str,
        max_rows: int,
        max_bytes: int,
        compression: str = "zstd",
        cut_on: str | None = None,
        digests: bool = False,
    ):
        self.fs = fs
        self.directory = directory
        self.prefix = prefix
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.compression = compression
        self.cut_on = cut_on
        self.cut_rows = max(1, max_rows // CUT_FRACTION)  # a content-defined shard's least rows, and the spread
        self.digests: list[str] | None = [] if digests else None
        self.shards: list[str] = []
        self.shard_rows: list[int] = []
        self.rows = 0
        self.bytes = 0  # uncompressed Arrow bytes written
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._file = None
        self._shard_bytes = 0
        self._pending: list[pa.Table] = []  # content-defined shards: rows not yet in a full row group
        self._pending_rows = 0

    def _open(self, schema: pa.Schema) -> None:
        name = f"{self.prefix}-{len(self.shards):04d}.parquet"
        self.fs.makedirs(self.directory, exist_ok=True)
        self._file = self.fs.open(join(self.fs, self.directory, name), "wb")
        self._writer = pq.ParquetWriter(self._file, schema, compression=self.compression)
        self.shards.append(name)
        self.shard_rows.append(0)
        self._shard_bytes = 0

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        if data.num_rows == 0:
            return
        if self.schema is None:
            self.schema = data.schema
        elif not data.schema.equals(self.schema):
            data = data.cast(self.schema)
        cuts = self._content_cuts(data)
        offset = 0
        while offset < data.num_rows:
            if self._writer is None:
                self._open(self.schema)
            room = self.max_rows - self.shard_rows[-1]
            at_cut = False
            if cuts:  # the next content-defined end: the first cut row once the shard holds the minimum
                first = offset + max(0, self.cut_rows - self.shard_rows[-1] - 1)
                ends = [c for c in cuts if c >= first]
                if ends and ends[0] - offset + 1 <= room:
                    room, at_cut = ends[0] - offset + 1, True
                cuts = [c for c in ends if c >= offset + room]
            piece = data.slice(offset, room)
            self._put(piece if isinstance(piece, pa.Table) else pa.Table.from_batches([piece]))
            offset += piece.num_rows
            self.shard_rows[-1] += piece.num_rows
            self._shard_bytes += piece.nbytes
            self.rows += piece.num_rows
            self.bytes += piece.nbytes
            if at_cut or self.shard_rows[-1] >= self.max_rows or self._shard_bytes >= self.max_bytes:
                self._close_shard()

    def _put(self, table: pa.Table) -> None:
        if self.cut_on is None:
            self._writer.write(table)
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= CUT_ROW_GROUP:
            self._flush_groups(final=False)

    def _flush_groups(self, final: bool) -> None:
        if not self._pending_rows:
            return
        rows = pa.concat_tables(self._pending)
        n = rows.num_rows if final else rows.num_rows // CUT_ROW_GROUP * CUT_ROW_GROUP
        # contiguous columns: how the rows were chunked must not show in the file's pages either
        self._writer.write_table(rows.slice(0, n).combine_chunks(), row_group_size=CUT_ROW_GROUP)
        rest = rows.slice(n)
        self._pending, self._pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def _content_cuts(self, data: pa.RecordBatch | pa.Table) -> list[int]:
        """Rows after which a content-defined shard may end (their cut column hashes to 0 mod cut_rows)."""
        if self.cut_on is None or self.cut_on not in data.schema.names:
            return []
        hashes = _cut_hashes(data.column(self.cut_on).to_pylist())
        return [i for i, h in enumerate(hashes) if h % self.cut_rows == 0]

    def end_of_item(self) -> None:
        """An item of the input (a file) ends here: a content-defined shard that holds its least rows ends
        with it, so an item added after it starts a shard of its own."""
        if self.cut_on is not None and self._writer is not None and self.shard_rows[-1] >= self.cut_rows:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._flush_groups(final=True)
            self._writer.close()
            self._file.close()
            self._writer = None
            self._file = None
            if self.digests is not None:
                self.digests.append(shard_digest(self.fs, join(self.fs, self.directory, self.shards[-1])))

    def close(self) -> None:
        self._close_shard()

    def summary(self) -> dict[str, Any]:
        out = {
            "shards": list(self.shards),
            "shard_rows": list(self.shard_rows),
            "rows": self.rows,
            "bytes": self.bytes,
            "schema": self.schema.names if self.schema else None,
        }
        if self.digests is not None and len(self.digests) == len(self.shards):
            out["digests"] = list(self.digests)
        return out


class ArtifactWriter:
    """What a stage writes one unit of work through.

    - `write(batch)`: kept rows (the artifact's data table), counted as rows out;
    - `reject(reason, detail, **row)`: one dropped row, counted under its reason, its text truncated
      past MAX_REJECT_TEXT_CHARS, batched into the `rejects/` table;
    - `table(name).write(batch)`: any other named table (`validation`, a report);
    - `stats`: the unit's accounting (`stats.count(key, n)` for a stage's own counters).

    Shards are named after the unit (`part-<unit>-<n>.parquet`), so the finished artifact's layout and
    row order do not depend on which worker ran which unit, or when. `scratch` is a directory that
    survives a killed attempt at the unit (a crawl keeps its frontier there, training its checkpoints'
    run spec) and is dropped at commit; it is None on stores that are not local. `lock_fd`, when set,
    is the open file whose lock marks this unit as being written: a launcher passes it on to the
    processes it starts, so the lock lasts as long as any of them.
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
        lock_fd: int | None = None,
        cut_on: str | None = None,
        find_prefix: Any = None,
    ):
        self.fs = fs
        self.directory = directory
        self.unit = unit
        self._on_progress = on_progress
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.scratch = scratch
        self.lock_fd = lock_fd
        self.cut_on = cut_on
        # a stage that judges its input in order (dedup_clusters) names each leading part of its input by a
        # key (`prefixes`, recorded with the unit), and looks for an earlier artifact that judged such a
        # part (`find_prefix(keys)` -> (directory, unit record, key) or None; Staging.find_prefix)
        self.prefixes: list[str] = []
        self.find_prefix = find_prefix or (lambda keys: None)
        self.stats = StageStats()
        self.tables: dict[str, ShardWriter] = {}
        self.data = self.table(DATA_TABLE)
        self.rejects = self.table(REJECTS_DIR)
        self._reject_rows = RowBatcher(REJECT_SCHEMA, REJECT_BATCH_ROWS)
        self._on_rows = on_rows

    def table(self, name: str) -> ShardWriter:
        if name not in self.tables:
            if name != DATA_TABLE and not name.replace("_", "").replace("-", "").isalnum():
                raise ArtifactError(f"bad table name {name!r}")
            data = name == DATA_TABLE
            directory = self.directory if data else join(self.fs, self.directory, name)
            self.tables[name] = ShardWriter(
                self.fs,
                directory,
                f"part-{self.unit:05d}",
                self.shard_rows,
                self.shard_bytes,
                cut_on=self.cut_on if data else None,
                digests=data and is_local(self.fs),  # what the stages downstream key their units by
            )
        return self.tables[name]

    def write(self, data: pa.RecordBatch | pa.Table | None, count: bool = True) -> None:
        """Kept rows. `count=False` for a stage whose rows out are not its data rows (set them itself)."""
        if data is None or data.num_rows == 0:
            return
        self.data.write(data)
        if count:
            self.stats.rows_out += data.num_rows
        if self._on_rows:
            self._on_rows(data.num_rows)

    def reject(self, reason: str, detail: str = "", **row: Any) -> None:
        """One dropped row, with why (`reason`, a short stable code) and the particulars (`detail`).
        `row` holds what could be recovered of it (id, text, source, url, lang, meta)."""
        self.stats.reject(reason)
        text = row.get("text")
        if isinstance(text, str) and len(text) > MAX_REJECT_TEXT_CHARS:
            detail = f"{detail} (text truncated from {len(text)} chars)"
            row["text"] = text[:MAX_REJECT_TEXT_CHARS]
        batch = self._reject_rows.add(**row, reason=reason, detail=detail)
        if batch is not None:
            self._write_rejects(batch)

    def reject_batch(self, batch: pa.RecordBatch | pa.Table | None) -> None:
        """Dropped rows prepared as a batch with a `reason` column (one count per row and reason)."""
        if batch is None or batch.num_rows == 0:
            return
        if "reason" not in batch.schema.names:
            raise ArtifactError("rejected rows need a 'reason' column")
        for reason in batch.column("reason").to_pylist():
            self.stats.reject(reason)
        self._write_rejects(batch)

    def _write_rejects(self, batch: pa.RecordBatch | pa.Table) -> None:
        self.rejects.write(batch)
        if self._on_rows:
            self._on_rows(batch.num_rows)

    def count(self, key: str, n: int | float = 1) -> None:
        self.stats.count(key, n)

    def end_of_item(self) -> None:
        """A source says an item (a file) ends here: a content-defined data shard may end with it."""
        self.data.end_of_item()

    def progress(self, fraction: float, note: str = "") -> None:
        """Report how far a long unit has got (training steps, crawled pages); Prefect shows it live."""
        if self._on_progress:
            self._on_progress(max(0.0, min(1.0, fraction)), note)

    def close(self) -> None:
        batch = self._reject_rows.flush()
        if batch is not None:
            self._write_rejects(batch)
        for t in self.tables.values():
            t.close()

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: t.summary() for name, t in self.tables.items()}
