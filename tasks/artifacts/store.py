"""The store: where artifacts are assembled (staging), committed, found and replaced.

An artifact is a directory `<root>/<stage>/<fingerprint>/` holding Parquet shards (`part-*.parquet`),
rejected rows under `rejects/`, other named tables in their own folders, and `_manifest.json`.

Writing happens in a staging directory next to the final one. Work is split into *units*; each unit's
shards count only once its marker `_units/<n>.json` exists, so a killed stage resumes at the first
unfinished unit, and a unit being written holds a lock (`_locks/<n>.lock`, with its owner's pid) that
a second run waits for instead of writing the same files. The commit writes the manifest and swaps
the staging directory into place: on local disk with one atomic exchange of the two directories, so a
reader sees the old artifact or the new one whole, never neither and never a mix. On object stores
(no atomic rename) the data is moved first and the manifest written last: an artifact exists if and
only if its manifest does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts.paths import (
    DATA_TABLE,
    LOCKS_DIR,
    MANIFEST,
    NO_REUSE,
    REJECTS_DIR,
    SCRATCH_DIR,
    UNITS_DIR,
    ArtifactError,
    basename,
    fs_and_path,
    is_local,
    join,
    parent,
    unstrip,
)
from tasks.artifacts.read import Artifact
from tasks.artifacts.stats import StageStats
from tasks.artifacts.write import MAX_REJECT_TEXT_CHARS, REJECT_SCHEMA, ArtifactWriter, shard_digest

log = logging.getLogger("kiln.store")

_UNIT_INDEX_CACHE: dict[tuple[str, Any, str], dict[str, dict[str, dict[str, Any]]]] = {}
UNIT_LOCK_WAIT_SECONDS = float(os.environ.get("KILN_UNIT_LOCK_WAIT", "60"))


class UnitBusy(ArtifactError):
    """Another live process is writing this unit of this artifact."""


# --------------------------------------------------------------------------------------------------
# atomic directory replacement


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the OS or the
    filesystem cannot; the caller then falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _remove_tree_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def replace_directory(staging: str, final: str) -> None:
    """Make `staging` the directory at `final` (local disk). Readers of `final` see the old directory
    or the new one, whole: an existing one is exchanged atomically where the OS allows, and the old
    copy removed afterwards."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if not os.path.exists(final):
        try:
            os.rename(staging, final)
            return
        except OSError:
            if not os.path.exists(final):
                raise
    trash = f"{final}.trash-{uuid.uuid4().hex[:8]}"
    if _exchange(staging, final):
        os.rename(staging, trash)  # the old artifact, now at the staging path
    else:  # no exchange: a short window without the directory, recovered by recover_trash()
        os.rename(final, trash)
        os.rename(staging, final)
    _remove_tree_quietly(fsspec.filesystem("file"), trash)


def recover_trash(final: str) -> bool:
    """A commit killed between the two renames of the fallback path leaves the old artifact under a
    `.trash-` name and nothing at `final`: put it back."""
    base = os.path.dirname(final)
    if not os.path.isdir(base):
        return False
    prefix = os.path.basename(final) + ".trash-"
    for name in sorted(os.listdir(base)):
        cand = os.path.join(base, name)
        if name.startswith(prefix) and os.path.exists(os.path.join(cand, MANIFEST)) and not os.path.exists(final):
            os.rename(cand, final)
            return True
    return False


# --------------------------------------------------------------------------------------------------
# staging


class Staging:
    """The staging directory where one artifact is assembled, unit by unit, before its commit."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, staging_dir: str, final_dir: str, shard_rows: int, shard_bytes: int
    ):
        self.fs = fs
        self.dir = staging_dir
        self.final_dir = final_dir
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.reuse_units = True  # look for keyed units in the other artifacts of this stage

    # -- units ---------------------------------------------------------------------------------

    def _marker(self, unit: int) -> str:
        return join(self.fs, self.dir, UNITS_DIR, f"{unit:05d}.json")

    def unit_result(self, unit: int) -> dict[str, Any] | None:
        """The recorded result of a finished unit, or None if it has to (re)run."""
        marker = self._marker(unit)
        if not self.fs.exists(marker):
            return None
        with self.fs.open(marker, "r") as f:
            return json.load(f)

    def begin_unit(
        self,
        unit: int,
        on_rows: Any = None,
        on_progress: Any = None,
        lock_fd: int | None = None,
        cut_on: str | None = None,
    ) -> ArtifactWriter:
        """Clear the shards a killed attempt at this unit left behind (not its scratch), return its writer.
        `cut_on`: the column whose values end the data shards (a source's content-defined shards)."""
        if self.fs.exists(self.dir):
            pattern = f"part-{unit:05d}-*.parquet"
            for path in self.fs.glob(join(self.fs, self.dir, pattern)) + self.fs.glob(
                join(self.fs, self.dir, "*", pattern)
            ):
                self.fs.rm(path)
        self.fs.makedirs(self.dir, exist_ok=True)
        scratch = None
        if is_local(self.fs):
            scratch = join(self.fs, self.dir, SCRATCH_DIR, f"{unit:05d}")
            os.makedirs(scratch, exist_ok=True)
        return ArtifactWriter(
            self.fs,
            self.dir,
            unit,
            self.shard_rows,
            self.shard_bytes,
            on_rows,
            scratch,
            on_progress,
            lock_fd,
            cut_on=cut_on,
            find_prefix=self.find_prefix,
        )

    def finish_unit(self, unit: int, writer: ArtifactWriter, key: str | None = None) -> dict[str, Any]:
        writer.close()
        result = {"unit": unit, "stats": writer.stats.to_dict(), "tables": writer.summary()}
        if key is not None:
            result["key"] = key
        if writer.prefixes:
            result["prefixes"] = list(writer.prefixes)
        return self._write_marker(unit, result)

    def _write_marker(self, unit: int, result: dict[str, Any]) -> dict[str, Any]:
        marker = self._marker(unit)
        self.fs.makedirs(join(self.fs, self.dir, UNITS_DIR), exist_ok=True)
        tmp = marker + f".tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "w") as f:
            json.dump(result, f)
        self.fs.mv(tmp, marker)
        return result

    @contextlib.contextmanager
    def lock_unit(self, unit: int, wait_seconds: float | None = None) -> Iterator[int | None]:
        """Hold the unit's lock while it is written: an flock on `_locks/<unit>.lock`, released by the
        kernel when every process holding the file is gone (a killed run's lock frees itself; a
        launcher passes the descriptor to what it starts, so a lock outlives its holder only while
        that holder's children still write). A second writer waits up to `wait_seconds`, then fails
        naming the owner. Stores that are not local have no lock (yield None)."""
        if not is_local(self.fs):
            yield None
            return
        import fcntl

        wait = UNIT_LOCK_WAIT_SECONDS if wait_seconds is None else wait_seconds
        os.makedirs(join(self.fs, self.dir, LOCKS_DIR), exist_ok=True)
        path = join(self.fs, self.dir, LOCKS_DIR, f"{unit:05d}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    owner = _lock_owner(fd)
                    if time.monotonic() >= deadline:
                        raise UnitBusy(
                            f"unit {unit} of {self.final_dir} is being written by another live run ({owner}); "
                            "wait for it to finish or stop it, then rerun"
                        ) from None
                    if not told:
                        log.warning(
                            "unit %d of %s is locked by %s; waiting up to %.0f s", unit, self.final_dir, owner, wait
                        )
                        told = True
                    time.sleep(0.5)
            os.ftruncate(fd, 0)
            os.pwrite(
                fd,
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "since": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                ).encode(),
                0,
            )
            yield fd
        finally:
            os.close(fd)

    def assert_no_live_writer(self) -> None:
        """Refuse to throw away a staging directory while a live run writes into it."""
        if not is_local(self.fs):
            return
        import fcntl

        locks = join(self.fs, self.dir, LOCKS_DIR)
        if not os.path.isdir(locks):
            return
        for name in sorted(os.listdir(locks)):
            fd = os.open(os.path.join(locks, name), os.O_RDWR)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UnitBusy(
                        f"{self.final_dir} is being written by another live run ({_lock_owner(fd)}); "
                        "wait for it or stop it first"
                    ) from None
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    # -- unit reuse ----------------------------------------------------------------------------

    @property
    def may_reuse(self) -> bool:
        """Whether units may come from earlier artifacts (not for a refresh, nor outside a store)."""
        return self.reuse_units and not self.fs.exists(join(self.fs, self.dir, UNITS_DIR, NO_REUSE))

    def find_unit(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """A unit with this key in another committed artifact of the same stage: (its directory, its
        record). Only stages that give their units keys (Stage.unit_key) record them."""
        found = self._search([key], "key")
        return found[:2] if found else None

    def find_prefix(self, keys: list[str]) -> tuple[str, dict[str, Any], str] | None:
        """The first of `keys` that a unit of another committed artifact of the same stage recorded among
        its `prefixes` (ArtifactWriter.prefixes): (that artifact's directory, the unit's record, the key).
        A stage that judges its input in order continues from there instead of starting over; none when
        this artifact must recompute everything (a refresh)."""
        return self._search(keys, "prefixes") if self.may_reuse else None

    def _search(self, keys: list[str], field: str) -> tuple[str, dict[str, Any], str] | None:
        stage_dir = parent(self.fs, self.final_dir)
        if not keys or not self.fs.exists(stage_dir):
            return None
        indexes = []
        for entry in sorted(self.fs.ls(stage_dir, detail=False), reverse=True):
            name = basename(entry)
            if name.startswith(".") or ".trash-" in name or entry.rstrip("/") == self.final_dir.rstrip("/"):
                continue
            index = self._unit_index(join(self.fs, entry, MANIFEST))[field]
            if index:
                indexes.append((entry, index))
        for key in keys:
            for entry, index in indexes:
                record = index.get(key)
                if record is not None:
                    return entry, record, key
        return None

    def _unit_index(self, manifest_path: str) -> dict[str, dict[str, dict[str, Any]]]:
        """{"key": key -> unit record, "prefixes": prefix key -> unit record} of one committed artifact;
        parsed once per manifest version (artifacts are immutable; a refreshed one has a new manifest, so
        size and mtime are part of the cache key)."""
        empty: dict[str, dict[str, dict[str, Any]]] = {"key": {}, "prefixes": {}}
        try:
            info = self.fs.info(manifest_path)
        except (FileNotFoundError, NotADirectoryError):
            return empty
        modified = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        stamp = (self.fs.unstrip_protocol(manifest_path), info.get("size"), str(modified))
        index = _UNIT_INDEX_CACHE.get(stamp)
        if index is None:
            try:
                with self.fs.open(manifest_path, "r") as f:
                    manifest = json.load(f)
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                return empty
            records = manifest.get("unit_results", ())
            index = {
                "key": {r["key"]: r for r in records if r.get("key")},
                "prefixes": {p: r for r in records for p in r.get("prefixes", ())},
            }
            if len(_UNIT_INDEX_CACHE) > 256:
                _UNIT_INDEX_CACHE.clear()
            _UNIT_INDEX_CACHE[stamp] = index
        return index

    def adopt_unit(self, unit: int, key: str) -> dict[str, Any] | None:
        """Copy a unit with the same key from another committed artifact instead of recomputing it; None
        if there is none. The copies are made before the marker, so a killed copy is simply redone."""
        found = self.find_unit(key) if self.may_reuse else None
        if found is None:
            return None
        src_dir, record = found
        old_prefix, new_prefix = f"part-{record['unit']:05d}-", f"part-{unit:05d}-"
        self.begin_unit(unit).close()  # clears what a killed attempt at this unit left
        tables: dict[str, Any] = {}
        try:
            for name, table in record["tables"].items():
                src_base = src_dir if name == DATA_TABLE else join(self.fs, src_dir, name)
                dst_base = self.dir if name == DATA_TABLE else join(self.fs, self.dir, name)
                if table["shards"]:
                    self.fs.makedirs(dst_base, exist_ok=True)
                shards = []
                for shard in table["shards"]:
                    renamed = new_prefix + shard[len(old_prefix) :] if shard.startswith(old_prefix) else shard
                    self._link_or_copy(join(self.fs, src_base, shard), join(self.fs, dst_base, renamed))
                    shards.append(renamed)
                tables[name] = {**table, "shards": shards}
        except FileNotFoundError:  # the source artifact went away meanwhile (gc, a refresh): recompute
            self.begin_unit(unit).close()
            return None
        result = {
            "unit": unit,
            "stats": record["stats"],
            "tables": tables,
            "key": key,
            "reused_from": basename(src_dir),
        }
        return self._write_marker(unit, result)

    def _link_or_copy(self, src: str, dst: str) -> None:
        """A committed shard into this artifact: a hard link on local disk (artifacts are immutable and
        nothing in the store writes into an existing file: shards are only ever created, renamed or
        removed), a copy where links are impossible (another filesystem, an object store)."""
        if is_local(self.fs):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)  # never open a path for writing that may be a link to a committed shard
            try:
                os.link(src, dst)
                return
            except FileNotFoundError:
                raise
            except OSError:
                pass
        self.fs.copy(src, dst)

    # -- commit --------------------------------------------------------------------------------

    def commit(
        self,
        manifest: dict[str, Any],
        n_units: int,
        finalize: Callable[[str, Any], Any] | None = None,
        unique_ids: bool = False,
    ) -> Artifact:
        """Assemble the manifest from the unit markers and move the artifact into place.

        `unique_ids`: rows whose `id` repeats one kept earlier (in unit order) are moved to the rejects
        with reason `duplicate_id` first. `finalize(directory, fs)`, if given, runs on the complete
        staging directory just before the commit (to add files such as a Hugging Face dataset or a
        tokenizer) and returns manifest fields.
        """
        units = []
        for i in range(n_units):
            r = self.unit_result(i)
            if r is None:
                raise ArtifactError(f"cannot commit {self.final_dir}: unit {i} of {n_units} has not finished")
            units.append(r)
        if unique_ids:
            units = DuplicateIds(self).drop(units)
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
                "shard_rows": [n for p in parts for n in p.get("shard_rows", [None] * len(p["shards"]))],
                "schema": next((p["schema"] for p in parts if p["schema"]), None),
            }
            if None in tables[name]["shard_rows"]:  # a unit copied from an artifact that did not record them
                del tables[name]["shard_rows"]
            digests = [d for p in parts for d in p.get("digests", [None] * len(p["shards"]))]
            if any(digests):  # the shards' content identities (null: computed when asked, Artifact.shard_digest)
                tables[name]["digests"] = digests
        manifest = dict(manifest)
        if any(r.get("key") or r.get("prefixes") for r in units):  # units another artifact of this stage may reuse
            manifest["unit_results"] = [
                {k: r[k] for k in ("unit", "key", "prefixes", "stats", "tables", "reused_from") if k in r}
                for r in units
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
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.fs.makedirs(self.dir, exist_ok=True)
        if finalize is not None:  # before the unit markers go, so a failed finalize can simply be retried
            manifest.update(finalize(self.dir, self.fs) or {})
        self._drop_unlisted_shards(tables)
        for leftover in (UNITS_DIR, SCRATCH_DIR, LOCKS_DIR):
            path = join(self.fs, self.dir, leftover)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        body = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False)
        final_manifest = join(self.fs, self.final_dir, MANIFEST)

        if is_local(self.fs):
            with open(join(self.fs, self.dir, MANIFEST), "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            replace_directory(self.dir, self.final_dir)
        else:
            if self.fs.exists(self.final_dir):  # the manifest goes first: no reader sees a half artifact
                if self.fs.exists(final_manifest):
                    self.fs.rm(final_manifest)
                self.fs.rm(self.final_dir, recursive=True)
            if self.fs.exists(self.dir):
                self.fs.mv(self.dir, self.final_dir, recursive=True)
            with self.fs.open(final_manifest, "w") as f:  # last: the manifest is the commit
                f.write(body)
        return Artifact(path=unstrip(self.fs, self.final_dir), manifest=manifest)

    def _drop_unlisted_shards(self, tables: dict[str, Any]) -> None:
        """Parquet files that no table lists (left by a unit rewritten at commit, or an aborted attempt)
        would be data nobody accounts for: they do not go into the artifact."""
        for name, table in tables.items():
            base = self.dir if name == DATA_TABLE else join(self.fs, self.dir, name)
            listed = set(table["shards"])
            for path in self.fs.glob(join(self.fs, base, "part-*.parquet")):
                if basename(path) not in listed:
                    self.fs.rm(path)

    def discard(self) -> None:
        if self.fs.exists(self.dir):
            self.assert_no_live_writer()
            self.fs.rm(self.dir, recursive=True)

    def recompute_all(self) -> None:
        """A refresh: start over, and copy no unit from earlier artifacts either (the flag lives in the
        staging directory, so unit tasks in other processes see it, and goes away with the commit)."""
        self.discard()
        self.fs.makedirs(join(self.fs, self.dir, UNITS_DIR), exist_ok=True)
        with self.fs.open(join(self.fs, self.dir, UNITS_DIR, NO_REUSE), "w") as f:
            f.write("refresh: every unit is recomputed\n")


def _lock_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "owner unknown"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


# --------------------------------------------------------------------------------------------------
# unique ids


class DuplicateIds:
    """Keeps `id` unique within an artifact: every row whose id repeats one kept earlier (in unit
    order, then row order) becomes a reject `duplicate_id` naming the unit that kept it.

    Ids are hashed to 64 bits in one pass over the id columns (8 bytes a row in memory); rows whose
    hash repeats are checked against the real strings in a second pass over just those shards. A unit
    that loses rows is rewritten under new shard names and its marker replaced last, so a commit
    killed half way is simply redone. A unit that lost rows to an earlier unit drops its reuse key
    (what it keeps now depends on the units before it); one that only repeated its own ids keeps it."""

    def __init__(self, staging: Staging):
        self.staging = staging
        self.fs = staging.fs

    def _shard_path(self, name: str) -> str:
        return join(self.fs, self.staging.dir, name)

    def _ids(self, name: str) -> list[Any]:
        with self.fs.open(self._shard_path(name), "rb") as f:
            return pq.read_table(f, columns=["id"]).column("id").to_pylist()

    def drop(self, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import hashlib

        import numpy as np

        hashes, where = [], []  # where: (unit position, shard position) per shard read
        for ui, r in enumerate(units):
            data = r["tables"].get(DATA_TABLE)
            if not data or not data["shards"] or "id" not in (data.get("schema") or []):
                continue
            for si, name in enumerate(data["shards"]):
                ids = self._ids(name)
                h = np.fromiter(
                    (
                        int.from_bytes(
                            hashlib.blake2b(str(x).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                            "little",
                            signed=True,
                        )
                        for x in ids
                    ),
                    dtype=np.int64,
                    count=len(ids),
                )
                hashes.append(h)
                where.append((ui, si, len(ids)))
        if not hashes:
            return units
        flat = np.concatenate(hashes)
        order = np.argsort(flat, kind="stable")  # stable: within a hash, corpus order
        sorted_h = flat[order]
        repeat = np.zeros(len(flat), dtype=bool)
        repeat[1:] = sorted_h[1:] == sorted_h[:-1]
        if not repeat.any():
            return units
        starts = repeat.copy()
        starts[:-1] |= repeat[1:]
        candidates = np.sort(order[starts])  # every row in a group whose hash repeats, in corpus order
        offsets = np.cumsum([0] + [n for _, _, n in where])
        first_kept: dict[Any, int] = {}  # id -> unit that kept it
        drops: dict[tuple[int, int], list[int]] = {}
        shard_of = np.searchsorted(offsets, candidates, side="right") - 1
        for s in np.unique(shard_of):
            ui, si, _ = where[s]
            ids = self._ids(units[ui]["tables"][DATA_TABLE]["shards"][si])
            for pos in candidates[shard_of == s]:
                row = int(pos - offsets[s])
                key = ids[row]
                if key in first_kept:
                    drops.setdefault((ui, si), []).append(row)
                else:
                    first_kept[key] = units[ui]["unit"]
        for ui in sorted({ui for ui, _ in drops}):
            mine = {si: rows for (u, si), rows in drops.items() if u == ui}
            # a unit that only repeated its own ids is still a function of its input alone: reusable
            ids_dropped = {
                self._ids(units[ui]["tables"][DATA_TABLE]["shards"][si])[r] for si, rows in mine.items() for r in rows
            }
            own = all(first_kept[i] == units[ui]["unit"] for i in ids_dropped)
            units[ui] = self._rewrite(units[ui], mine, first_kept, keep_key=own)
        return units

    def _rewrite(
        self, record: dict[str, Any], drops: dict[int, list[int]], kept_by: dict[Any, int], keep_key: bool = False
    ) -> dict[str, Any]:
        import numpy as np

        unit = record["unit"]
        data = dict(record["tables"][DATA_TABLE])
        shards, shard_rows = list(data["shards"]), list(data.get("shard_rows") or [None] * len(data["shards"]))
        digests = list(data.get("digests") or [None] * len(shards))
        dropped_tables, old = [], []
        new_bytes = data["bytes"]
        for si, rows in sorted(drops.items()):
            name = shards[si]
            with self.fs.open(self._shard_path(name), "rb") as f:
                table = pq.read_table(f)
            keep = np.ones(table.num_rows, dtype=bool)
            keep[rows] = False
            kept, gone = table.filter(pa.array(keep)), table.filter(pa.array(~keep))
            dropped_tables.append(gone)
            new_bytes -= gone.nbytes
            old.append(name)
            stem = name[: -len(".parquet")]
            new_name = f"{stem}-u{uuid.uuid4().hex[:6]}.parquet"
            if kept.num_rows:
                with self.fs.open(self._shard_path(new_name), "wb") as f:
                    pq.write_table(kept, f, compression="zstd")
                shards[si], shard_rows[si] = new_name, kept.num_rows
                digests[si] = shard_digest(self.fs, self._shard_path(new_name)) if is_local(self.fs) else None
            else:
                shards[si], shard_rows[si] = None, None
        keep_idx = [i for i, s in enumerate(shards) if s is not None]
        gone = pa.concat_tables(dropped_tables)
        n = gone.num_rows
        ids = gone.column("id").to_pylist()
        cols = {
            c: (gone.column(c).to_pylist() if c in gone.schema.names else [None] * n)
            for c in ("id", "text", "source", "url", "lang", "meta")
        }
        cols["text"] = [t[:MAX_REJECT_TEXT_CHARS] if isinstance(t, str) else t for t in cols["text"]]
        cols["reason"] = ["duplicate_id"] * n
        cols["detail"] = [f"id {i!r} repeats a row kept in unit {kept_by.get(i)}" for i in ids]
        rejects = pa.Table.from_pydict(cols, schema=REJECT_SCHEMA)
        rej_name = f"part-{unit:05d}-dupid-{uuid.uuid4().hex[:6]}.parquet"
        rej_dir = join(self.fs, self.staging.dir, REJECTS_DIR)
        self.fs.makedirs(rej_dir, exist_ok=True)
        with self.fs.open(join(self.fs, rej_dir, rej_name), "wb") as f:
            pq.write_table(rejects, f, compression="zstd")
        rej = dict(
            record["tables"].get(REJECTS_DIR) or {"shards": [], "shard_rows": [], "rows": 0, "bytes": 0, "schema": None}
        )
        tables = dict(record["tables"])
        tables[DATA_TABLE] = {
            **data,
            "shards": [shards[i] for i in keep_idx],
            "shard_rows": [shard_rows[i] for i in keep_idx],
            "rows": data["rows"] - n,
            "bytes": max(new_bytes, 0),
            "digests": [digests[i] for i in keep_idx],
        }
        if None in tables[DATA_TABLE]["shard_rows"]:
            del tables[DATA_TABLE]["shard_rows"]
        if not any(tables[DATA_TABLE]["digests"]):
            del tables[DATA_TABLE]["digests"]
        tables[REJECTS_DIR] = {
            **rej,
            "shards": rej["shards"] + [rej_name],
            "shard_rows": (rej.get("shard_rows") or [None] * len(rej["shards"])) + [n],
            "rows": rej["rows"] + n,
            "bytes": rej["bytes"] + rejects.nbytes,
            "schema": rej.get("schema") or REJECT_SCHEMA.names,
        }
        if None in tables[REJECTS_DIR]["shard_rows"]:
            del tables[REJECTS_DIR]["shard_rows"]
        stats = StageStats.from_dict(record["stats"])
        stats.rows_out -= n
        stats.reject("duplicate_id", n)
        new = {k: v for k, v in record.items() if k not in (() if keep_key else ("key", "reused_from"))}
        new.update(tables=tables, stats=stats.to_dict())
        self.staging._write_marker(unit, new)  # the new shards count from here on
        for name in old:
            try:
                self.fs.rm(self._shard_path(name))
            except FileNotFoundError:
                pass
        log.info("unit %d: %d row(s) rejected as duplicate_id", unit, n)
        return new


# --------------------------------------------------------------------------------------------------
# the store


class ArtifactStore:
    """A root directory (local path or fsspec URL) of artifacts laid out as `<stage>/<fingerprint>/`."""

    def __init__(self, root: str, shard_rows: int = 100_000, shard_bytes: int = 128 << 20):
        self.root = root
        self.fs, base = fs_and_path(root)
        self.base = os.path.abspath(base) if is_local(self.fs) else base
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes

    @property
    def is_local(self) -> bool:
        return is_local(self.fs)

    def _dir(self, stage: str, fp: str) -> str:
        return join(self.fs, self.base, stage, fp)

    def path(self, stage: str, fp: str) -> str:
        return unstrip(self.fs, self._dir(stage, fp))

    def is_committed(self, stage: str, fp: str) -> bool:
        final = self._dir(stage, fp)
        if self.fs.exists(join(self.fs, final, MANIFEST)):
            return True
        return self.is_local and recover_trash(final)

    def open(self, stage: str, fp: str) -> Artifact:
        return Artifact.open(self.path(stage, fp))

    def staging(self, stage: str, fp: str) -> Staging:
        # Deterministic name: a rerun after a crash finds the finished units of the attempt before it.
        staging_dir = join(self.fs, self.base, stage, f".staging-{fp}")
        if self.fs.exists(join(self.fs, staging_dir, MANIFEST)):
            # an old artifact swapped out by a refresh whose cleanup was killed: not a work in progress
            _remove_tree_quietly(self.fs, staging_dir)
        return Staging(self.fs, staging_dir, self._dir(stage, fp), self.shard_rows, self.shard_bytes)

    def committed(self) -> Iterator[tuple[str, str, str]]:
        """(stage, fingerprint, path) of every committed artifact."""
        if not self.fs.exists(self.base):
            return
        for stage_dir in sorted(self.fs.ls(self.base, detail=False)):
            stage = basename(stage_dir)
            if stage.startswith(("_", ".")) or not self.fs.isdir(stage_dir):
                continue
            for entry in sorted(self.fs.ls(stage_dir, detail=False)):
                name = basename(entry)
                if (
                    not name.startswith(".")
                    and ".trash-" not in name
                    and self.fs.exists(join(self.fs, entry, MANIFEST))
                ):
                    yield stage, name, unstrip(self.fs, entry)

    def leftovers(self) -> Iterator[str]:
        """Staging and trash directories: unfinished or abandoned writes."""
        if not self.fs.exists(self.base):
            return
        for stage_dir in sorted(self.fs.ls(self.base, detail=False)):
            if not self.fs.isdir(stage_dir):
                continue
            for entry in sorted(self.fs.ls(stage_dir, detail=False)):
                name = basename(entry)
                if name.startswith(".staging-") or ".trash-" in name:
                    yield unstrip(self.fs, entry)

    def remove(self, path: str) -> None:
        fs, p = fs_and_path(path)
        fs.rm(p, recursive=True)


def staging_for_directory(out_dir: str, shard_rows: int = 100_000, shard_bytes: int = 128 << 20) -> Staging:
    """A staging area whose commit lands at an explicit directory (`kiln stage ... --output DIR`)."""
    fs, final = fs_and_path(out_dir)
    if is_local(fs):
        final = os.path.abspath(final)
    base, name = final.rsplit("/", 1) if "/" in final else ("", final)
    staging_dir = join(fs, base, f".{name}.staging") if base else f".{name}.staging"
    staging = Staging(fs, staging_dir, final, shard_rows, shard_bytes)
    staging.reuse_units = False  # DIR's siblings are not a store's artifacts of one stage
    return staging
