"""WARC ingest (how Common Crawl is consumed): response, resource and WET conversion records -> documents.

Files are read through fsspec, so local paths, s3:// and https:// URLs all work. A damaged file keeps
its good records: when warcio cannot go on, the reader counts the bad record and resynchronises at
the next record boundary (the next gzip member of a .warc.gz, the next `WARC/1.` line of a plain
.warc). Gzip members are decompressed strictly (`_GzipMember`): warcio's reader goes on past a deflate
error. Truncated records are recognised by their unread remainder, altered ones by their digests.
"""

from __future__ import annotations

import glob as globlib
import io
import re
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from warcio.archiveiterator import ArchiveIterator

from tasks.artifacts import ArtifactWriter
from tasks.crawl.config import WarcSource
from tasks.crawl.extract import Extractor, parse_content_type
from tasks.crawl.report import CrawlReport
from tasks.crawl.urls import host_of, normalize_url
from tasks.documents import DOCUMENT_SCHEMA, DocumentBatcher, meta_json, stable_id
from tasks.stage import StageInputError

WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz", ".wet", ".wet.gz")
DOCUMENT_RECORD_TYPES = ("response", "resource", "conversion")
KNOWN_RECORD_TYPES = frozenset(
    {"warcinfo", "response", "resource", "request", "metadata", "revisit", "conversion", "continuation", "arc_header"}
)
_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_LINE = re.compile(rb"(?:^|\r?\n)WARC/1\.[01]\r?\n")
_SCAN_CHUNK = 1 << 20
_MEMBER_READ = 1 << 16
ANALYSE_BATCH_RECORDS = 64
ANALYSE_BATCH_BYTES = 32 << 20


def _identity(info: dict[str, Any]) -> Any:
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def resolve_warc_files(src: WarcSource, where: str) -> list[dict[str, Any]]:
    """The files of a WARC source in a stable order, with size and mtime (or ETag) as their identity."""
    files: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, pattern in enumerate(src.paths):
        field = f"{where}.paths[{i}]"
        try:
            fs, path = fsspec.core.url_to_fs(pattern)
        except (ValueError, ImportError) as e:
            raise StageInputError(field, f"cannot open {pattern!r}: {e}") from None
        local = isinstance(fs, LocalFileSystem)
        try:
            if globlib.has_magic(path):
                matches = sorted(fs.glob(path))
                if not matches:
                    raise StageInputError(field, f"no files match {pattern!r}")
            elif fs.exists(path):
                matches = [path]
            else:
                raise StageInputError(field, f"no such file or directory: {pattern!r}")
            expanded: list[str] = []
            for m in matches:
                if fs.isdir(m):
                    expanded += sorted(p for p in fs.find(m) if p.lower().endswith(WARC_SUFFIXES))
                else:
                    expanded.append(m)
            for m in expanded:
                info = fs.info(m)
                url = m if local else fs.unstrip_protocol(m)
                if url in seen:
                    continue
                seen.add(url)
                files.append({"path": url, "size": int(info.get("size") or 0), "mtime": _identity(info)})
        except StageInputError:
            raise
        except (OSError, ValueError) as e:
            raise StageInputError(field, f"cannot list {pattern!r}: {type(e).__name__}: {e}") from None
    if not files:
        raise StageInputError(f"{where}.paths", "matched no WARC files")
    return files


def _next_boundary(f: Any, start: int, gzipped: bool) -> int | None:
    """Offset of the first record boundary at or after `start`, or None at the end of the file."""
    pos = start
    carry = b""
    while True:
        f.seek(pos)
        chunk = f.read(_SCAN_CHUNK)
        if not chunk:
            return None
        data = carry + chunk
        base = pos - len(carry)
        if gzipped:
            i = data.find(_GZIP_MAGIC)
            if i >= 0:
                return base + i
        else:
            m = _WARC_LINE.search(data)
            if m:
                return base + m.start() + (len(m.group(0)) - len(m.group(0).lstrip(b"\r\n")))
        carry = data[-16:]
        pos += len(chunk)


def _damaged(offset: int, e: Exception) -> dict[str, Any]:
    return {"offset": offset, "error": f"{type(e).__name__}: {str(e)[:200]}".strip()}


def _cut_off(offset: int) -> dict[str, Any]:
    return {"offset": offset, "error": "the file ends inside a record", "reason": "truncated_record"}


def _read_record(record: Any, max_bytes: int) -> dict[str, Any]:
    h = record.rec_headers
    item: dict[str, Any] = {
        "type": record.rec_type,
        "uri": h.get_header("WARC-Target-URI"),
        "record_id": h.get_header("WARC-Record-ID"),
        "date": h.get_header("WARC-Date"),
        "status": None,
        "content_type": h.get_header("Content-Type"),
        "payload": None,
        "too_large": False,
        "truncated": False,
        "digest_failed": None,
    }
    if record.rec_type not in KNOWN_RECORD_TYPES:  # e.g. headers cut off mid-word by a truncation
        raise ValueError(f"unknown WARC record type {record.rec_type!r}")
    if record.rec_type not in DOCUMENT_RECORD_TYPES:
        return item
    if record.length is None:
        raise ValueError("record without Content-Length")
    if record.http_headers is not None and record.rec_type == "response":
        try:
            item["status"] = int(record.http_headers.get_statuscode())
        except (TypeError, ValueError):
            item["status"] = None
        item["content_type"] = record.http_headers.get_header("Content-Type")
    stream = record.content_stream()
    payload = stream.read(max_bytes + 1)
    if len(payload) > max_bytes:
        item["too_large"] = True
        payload = b""
    item["payload"] = payload
    # Read what is left of the record, so that a short record shows as unread remainder and the
    # digests (computed over the whole block) are settled.
    while record.raw_stream.read(1 << 16):
        pass
    item["truncated"] = getattr(record.raw_stream, "limit", 0) > 0
    checker = getattr(record, "digest_checker", None)
    if checker is not None and checker.passed is False:
        item["digest_failed"] = "; ".join(checker.problems)[:300]
    return item


class _GzipMember(io.RawIOBase):
    """The decompressed bytes of the one gzip member that starts at `start`, checked strictly.

    warcio's own reader, on a deflate error in the middle of a member, writes the error to stderr and
    reads the compressed bytes that follow as if they were plain text: a damaged record then turns into
    garbage records that swallow its good neighbours. This reader raises instead (zlib's error, or its
    CRC-32 and size check at the member's end) and says where the member ended.
    """

    def __init__(self, f: Any, start: int) -> None:
        self.f, self.next = f, start  # the offset of the first byte not yet read from the file
        self.z = zlib.decompressobj(wbits=31)  # a gzip header; the CRC-32 and size are checked at the end
        self.end: int | None = None  # the offset after the member, once its trailer has been checked
        self.at_eof = False  # the file ended before the member did

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = _SCAN_CHUNK if size is None or size < 0 else max(size, 1)
        while self.end is None and not self.at_eof:
            raw = self.z.unconsumed_tail  # input left over when the last call hit its output limit
            if not raw:
                self.f.seek(self.next)
                raw = self.f.read(_MEMBER_READ)
                if not raw:
                    self.at_eof = True
                    break
                self.next += len(raw)
            out = self.z.decompress(raw, want)
            if self.z.eof:  # what the member did not use of the bytes read
                self.end = self.next - len(self.z.unused_data)
            if out:
                return out
        return b""

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Read the member to its end, so that its trailer is checked."""
        while self.read(_SCAN_CHUNK):
            pass


def _iter_gzip(f: Any, max_bytes: int, check_digests: bool) -> Iterator[dict[str, Any]]:
    """The records of a .warc.gz member by member: a damaged member is one error, its neighbours kept.

    A member's records are held back until its trailer has been checked (a standard .warc.gz has one
    record per member); a file that is one big member yields its records in batches, checked by their
    digests alone.
    """
    pos = 0
    while True:
        f.seek(pos)
        head = f.read(len(_GZIP_MAGIC))
        if not head:
            return
        if head != _GZIP_MAGIC:  # padding or garbage after a member
            f.seek(pos)
            if not f.read(1 << 16).strip(b"\r\n\t \0"):
                return
            yield {"offset": pos, "error": "bytes after a gzip member that start no gzip member"}
            nxt = _next_boundary(f, pos + 1, True)
            if nxt is None:
                return
            pos = nxt
            continue
        member = _GzipMember(f, pos)
        held: list[dict[str, Any]] = []
        held_bytes = 0
        try:
            for record in ArchiveIterator(member, arc2warc=True, check_digests=check_digests):
                item = _read_record(record, max_bytes)
                item["offset"] = pos  # the member that holds the record: what a CDX index points at
                held.append(item)
                held_bytes += len(item["payload"] or b"")
                if len(held) >= ANALYSE_BATCH_RECORDS or held_bytes >= ANALYSE_BATCH_BYTES:
                    yield from held
                    held, held_bytes = [], 0
            member.finish()
        except Exception as e:  # zlib, warcio and the HTTP header parser each raise their own kinds
            if member.at_eof:  # cut off, not damaged: the records read whole before the cut are kept
                yield from (h for h in held if not h["truncated"])
                yield _cut_off(pos)
                return
            # damaged: nothing of the member is trusted (the records of a one-member file held since the
            # last batch are lost with it)
            yield _damaged(pos, e)
            nxt = _next_boundary(f, pos + 1, True)
            if nxt is None:
                return
            pos = nxt
            continue
        yield from held
        if member.end is None:  # the file ends inside this member
            if not any(h["truncated"] for h in held):
                yield _cut_off(pos)
            return
        pos = member.end


def iter_warc(f: Any, max_bytes: int, check_digests: bool = True) -> Iterator[dict[str, Any]]:
    """Every record of an open, seekable WARC/ARC file as a dict; a damaged one as {"error": ...}."""
    f.seek(0)
    if f.read(3) == _GZIP_MAGIC:
        yield from _iter_gzip(f, max_bytes, check_digests)
        return
    pos = 0
    while True:
        f.seek(pos)
        it = ArchiveIterator(f, arc2warc=True, check_digests=check_digests)
        try:
            for record in it:
                item = _read_record(record, max_bytes)
                item["offset"] = it.offset  # where this record starts: the end of the one before
                yield item
            end = it.offset
            f.seek(end)
            if f.read(1 << 16).strip(b"\r\n\t \0"):  # a record cut short before warcio saw its headers
                yield _cut_off(end)
            return
        except Exception as e:  # warcio, zlib and the HTTP header parser each raise their own kinds
            bad = it.offset  # the record being read, or the one after the last good record
            yield _damaged(bad, e)
            nxt = _next_boundary(f, bad + 1, False)
            if nxt is None:
                return
            pos = nxt


def ingest_warc(
    file: dict[str, Any],
    src: WarcSource,
    label: str,
    extractor: Extractor,
    out: ArtifactWriter,
    report: CrawlReport,
    batch_rows: int,
) -> None:
    include = [re.compile(p) for p in src.include]
    exclude = [re.compile(p) for p in src.exclude]
    stats = out.stats
    docs = DocumentBatcher(DOCUMENT_SCHEMA, batch_rows)
    path = file["path"]
    pending: list[dict[str, Any]] = []  # records waiting for extraction, in file order
    pending_bytes = 0

    def reject(item: dict[str, Any], reason: str, detail: str | None) -> None:
        url = item.get("uri")
        stats.rows_in += 1
        report.row(host_of(url) if url else "", reason)
        meta = {
            "warc_file": path,
            "warc_offset": item["offset"],
            "warc_record_id": item.get("record_id"),
            "warc_type": item.get("type"),
            "status": item.get("status"),
        }
        out.reject(
            reason,
            detail,
            id=stable_id(label, item.get("record_id") or f"{path}@{item['offset']}"),
            source=label,
            url=url,
            meta=meta_json({k: v for k, v in meta.items() if v is not None}),
        )

    def flush_pending() -> None:
        nonlocal pending, pending_bytes
        calls = [
            {
                "body": it["payload"],
                "url": it["url"],
                "media_type": it["media_type"],
                "header_charset": it["charset"],
                "follow_links": False,
                "fallback": src.extraction_fallback,
            }
            for it in pending
        ]
        for item, page in zip(pending, extractor.map(calls) if calls else []):
            if page["error"]:
                reject(item, "extraction_error", page["error"])
            elif not page["text"]:
                reject(item, "empty_extraction", f"no main text in {len(item['payload'])} bytes")
            else:
                url = item["url"]
                meta = {
                    "title": page["title"],
                    "url": url,
                    "status": item["status"],
                    "fetched_at": item["date"],
                    "content_type": item["media_type"],
                    "encoding": page["encoding"],
                    "warc_file": path,
                    "warc_offset": item["offset"],
                    "warc_record_id": item["record_id"],
                    "warc_type": item["type"],
                }
                stats.rows_in += 1
                report.row(host_of(url) if url else "", None)
                out.write(
                    docs.add(
                        id=stable_id(label, item["record_id"] or f"{path}@{item['offset']}"),
                        text=page["text"],
                        source=label,
                        url=url,
                        lang=None,
                        meta=meta_json({k: v for k, v in meta.items() if v is not None}),
                    )
                )
        pending, pending_bytes = [], 0

    records = other = 0
    with fsspec.open(path, "rb") as f:
        for item in iter_warc(f, src.max_body_bytes):
            records += 1
            if "error" in item:
                reject(item, item.get("reason", "corrupt_record"), item["error"])
                continue
            if item["type"] not in DOCUMENT_RECORD_TYPES:
                other += 1
                continue
            url = normalize_url(item["uri"]) if item["uri"] else None
            item["url"] = url or item["uri"]
            media, charset = parse_content_type(item["content_type"])
            if item["type"] == "conversion" and not media:
                media = "text/plain"
            payload = item["payload"] or b""
            if not media and payload.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
                media = "text/html"
            item["media_type"], item["charset"] = media, charset
            report.request(host_of(url) if url else "", item["status"], len(payload), None, attempts=0)
            if item["truncated"]:
                reason, detail = "truncated_record", "the record ends before its Content-Length"
            elif item["digest_failed"]:
                reason, detail = "digest_mismatch", item["digest_failed"]
            elif url and include and not any(p.search(url) for p in include):
                reason, detail = "out_of_scope", "matches no include pattern"
            elif url and any(p.search(url) for p in exclude):
                reason, detail = "out_of_scope", "matches an exclude pattern"
            elif item["status"] is not None and not 200 <= item["status"] < 300:
                reason, detail = f"http_{item['status']}", None
            elif media not in src.content_types:
                reason, detail = "content_type", item["content_type"] or "(none)"
            elif item["too_large"]:
                reason, detail = "too_large", f"payload over {src.max_body_bytes} bytes"
            else:
                reason, detail = None, None
            if reason:
                reject(item, reason, detail)
                continue
            pending.append(item)
            pending_bytes += len(payload)
            if len(pending) >= ANALYSE_BATCH_RECORDS or pending_bytes >= ANALYSE_BATCH_BYTES:
                flush_pending()
    flush_pending()
    out.write(docs.flush())
    stats.bytes_in += file["size"]
    out.count("warc_files")
    out.count("warc_records", records)
    out.count("warc_other_records", other)
