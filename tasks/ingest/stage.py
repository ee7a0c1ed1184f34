"""Ingest: local JSONL / JSON / CSV / Parquet / text files and Hugging Face datasets on disk -> documents.

Units are groups of input files (or dataset directories). Every input record either becomes a document
or a reject with a reason: rows_in == rows_out + rows_rejected, always. Ids are unique within the
artifact: a record whose id repeats one kept earlier is a `duplicate_id` reject (checked at commit).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field, field_validator

from tasks.artifacts import Artifact, ArtifactWriter, fingerprint
from tasks.documents import DOCUMENT_SCHEMA, MAX_REJECT_TEXT_CHARS, DocumentBatcher, meta_json, stable_id
from tasks.stage import Stage, StageConfig, StageInputError

Format = Literal["auto", "jsonl", "json", "csv", "parquet", "text", "hf_dataset"]

_EXT_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class IngestConfig(StageConfig):
    """Where the documents come from, and which fields hold what."""

    execution_fields = StageConfig.execution_fields | {"batch_rows", "unit_mb", "unit_files"}

    paths: list[str] = Field(
        ...,
        min_length=1,
        description="Files, directories or glob patterns (** recurses). Relative paths are taken from "
        "the working directory.",
    )
    format: Format = Field("auto", description="Input format; 'auto' picks by extension / dataset marker files.")
    text_extensions: list[str] = Field(
        [".txt", ".md", ".rst", ".txt.gz"],
        description="Extensions read as one-document-per-file text when walking directories in 'auto' mode.",
    )
    text_field: str = Field("text", description="Record field holding the document text.")
    id_field: str = Field("id", description="Record field kept as the document id (a stable hash when absent).")
    url_field: str = Field("url", description="Record field holding the document URL, if any.")
    lang_field: str = Field("lang", description="Record field holding a language code, if any.")
    source: str | None = Field(None, description="Source label for every document; default: the file path.")
    csv_delimiter: str | None = Field(
        None,
        min_length=1,
        max_length=1,
        description="CSV field separator; default ',' (and a tab for .tsv files). The first row names the fields.",
    )
    batch_rows: int = Field(2048, ge=1, description="Rows per Arrow batch while reading.")
    unit_mb: int = Field(64, ge=1, description="Group consecutive small files into units of work of about this size.")
    unit_files: int = Field(1000, ge=1, description="... and at most this many files per unit.")

    @field_validator("text_extensions")
    @classmethod
    def _dotted(cls, v: list[str]) -> list[str]:
        return [e if e.startswith(".") else f".{e}" for e in v]


def _is_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _HF_MARKERS)


def _format_of(path: str, cfg: IngestConfig, walking: bool) -> str | None:
    if cfg.format != "auto":
        return cfg.format
    lower = path.lower()
    for ext, fmt in _EXT_FORMATS.items():
        if lower.endswith(ext):
            return fmt
    if any(lower.endswith(ext) for ext in cfg.text_extensions):
        return "text"
    # A file named explicitly is read as text; one met while walking a directory is skipped.
    return None if walking else "text"


def _stat_identity(path: str) -> tuple[int, int]:
    if os.path.isdir(path):
        size, mtime = 0, 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                st = os.stat(os.path.join(root, name))
                size += st.st_size
                mtime = max(mtime, st.st_mtime_ns)
        return size, mtime
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def resolve_inputs(cfg: IngestConfig) -> list[dict[str, Any]]:
    """The files to read, in a deterministic order, with what identifies their content."""
    found: list[tuple[str, str]] = []
    for i, pattern in enumerate(cfg.paths):
        field = f"paths[{i}]"
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise StageInputError(field, f"no files match {pattern!r}")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise StageInputError(field, f"no such file or directory: {pattern!r}")
        for m in matches:
            if os.path.isdir(m) and (cfg.format == "hf_dataset" or (cfg.format == "auto" and _is_hf_dataset(m))):
                found.append((m, "hf_dataset"))
            elif os.path.isdir(m):
                for root, dirs, files in os.walk(m):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    for name in sorted(files):
                        if name.startswith("."):
                            continue
                        p = os.path.join(root, name)
                        fmt = _format_of(p, cfg, walking=True)
                        if fmt:
                            found.append((p, fmt))
            elif os.path.isfile(m):
                found.append((m, _format_of(m, cfg, walking=False)))
    if not found:
        raise StageInputError("paths", "matched no readable files")
    seen: set[str] = set()
    units = []
    for path, fmt in found:
        absolute = os.path.abspath(path)
        if absolute in seen:
            continue
        seen.add(absolute)
        size, mtime = _stat_identity(path)
        units.append({"path": path, "abspath": absolute, "format": fmt, "size": size, "mtime_ns": mtime})
    return units


class RecordEmitter:
    """Turns records into documents or rejects with a reason, batching documents into the writer.
    A stage that reads other kinds of records (instruction examples, labelled text) subclasses it and
    overrides `record` (and `schema`, for rows that are not documents)."""

    schema = DOCUMENT_SCHEMA

    def __init__(self, cfg: IngestConfig, out: ArtifactWriter, label: str):
        self.cfg = cfg
        self.out = out
        self.label = label
        self.docs = DocumentBatcher(self.schema, cfg.batch_rows)

    def reject(self, reason: str, detail: str, text: str | None, where: dict[str, Any], **fields: Any) -> None:
        self.out.stats.rows_in += 1
        self.out.reject(reason, detail, source=self.label, text=text, meta=meta_json({"_ingest": where}), **fields)

    def keep(self, **doc: Any) -> None:
        self.out.stats.rows_in += 1
        self.out.write(self.docs.add(**doc))

    def document_id(self, rec: dict[str, Any], where: dict[str, Any]) -> str:
        raw_id = rec.get(self.cfg.id_field)
        return str(raw_id) if raw_id is not None else stable_id(self.label, json.dumps(where, sort_keys=True))

    def text_of(self, rec: Any, where: dict[str, Any]) -> str | None:
        """The record's text, or None after rejecting the record with the reason."""
        cfg = self.cfg
        if not isinstance(rec, dict):
            self.reject("not_an_object", f"record is a {type(rec).__name__}", preview_record(rec), where)
            return None
        text = rec.get(cfg.text_field)
        if text is None:
            self.reject("missing_text", f"no {cfg.text_field!r} field", None, where)
            return None
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                self.reject("invalid_utf8", str(e), bytes(text).decode("utf-8", "replace"), where)
                return None
        if not isinstance(text, str):
            self.reject(
                "non_string_text", f"{cfg.text_field!r} is a {type(text).__name__}", preview_record(text), where
            )
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. JSON "\ud800"
            self.reject("invalid_utf8", str(e), text.encode("utf-8", "replace").decode("utf-8"), where)
            return None
        if not text.strip():
            self.reject("empty_text", "text is empty or whitespace", text, where)
            return None
        return text

    def record(self, rec: Any, where: dict[str, Any]) -> None:
        cfg = self.cfg
        text = self.text_of(rec, where)
        if text is None:
            return
        url = rec.get(cfg.url_field)
        lang = rec.get(cfg.lang_field)
        taken = {cfg.text_field, cfg.id_field}
        if isinstance(url, str):
            taken.add(cfg.url_field)
        else:
            url = None
        if isinstance(lang, str):
            taken.add(cfg.lang_field)
        else:
            lang = None
        meta = {k: v for k, v in rec.items() if k not in taken}
        meta["_ingest"] = where
        self.keep(
            id=self.document_id(rec, where), text=text, source=self.label, url=url, lang=lang, meta=meta_json(meta)
        )

    def flush(self) -> None:
        self.out.write(self.docs.flush())


def preview_record(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:MAX_REJECT_TEXT_CHARS]
    except (TypeError, ValueError):
        return repr(value)[:MAX_REJECT_TEXT_CHARS]


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl(path: str, em: RecordEmitter) -> None:
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            where = {"file": em.label, "line": line_no}
            if not raw.strip():
                em.out.count("blank_lines")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                em.reject("invalid_utf8", str(e), raw.decode("utf-8", "replace"), where)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                em.reject("invalid_json", str(e), line, where)
                continue
            em.record(rec, where)


def _read_json(path: str, em: RecordEmitter) -> None:
    where = {"file": em.label}
    with _open_binary(path) as f:
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        return em.reject("invalid_utf8", str(e), raw.decode("utf-8", "replace"), where)
    except json.JSONDecodeError as e:
        stripped = raw.decode("utf-8-sig").lstrip()
        if stripped.startswith("{") and "\n{" in stripped:  # really JSON Lines named .json
            return _read_jsonl(path, em)
        return em.reject("invalid_json", str(e), raw.decode("utf-8", "replace"), where)
    records = doc if isinstance(doc, list) else [doc]
    for i, rec in enumerate(records):
        em.record(rec, {"file": em.label, "row": i})


def _iter_parquet(path: str, batch_rows: int) -> Iterator[dict[str, Any]]:
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


def _read_records(records: Iterator[dict[str, Any]], em: RecordEmitter, where_extra: dict[str, Any]) -> None:
    row = 0
    try:
        for row, rec in enumerate(records):
            em.record(rec, {"file": em.label, **where_extra, "row": row})
    except Exception as e:  # a corrupt file keeps the rows read before the damage
        em.reject("unreadable_file", f"{type(e).__name__}: {e}", None, {"file": em.label, **where_extra})


def _read_csv(path: str, em: RecordEmitter) -> None:
    """CSV (or TSV) with a header row; every field a string. A row with more fields than the header is
    rejected; a short row's missing fields are absent."""
    delimiter = em.cfg.csv_delimiter or ("\t" if path.lower().endswith((".tsv", ".tsv.gz")) else ",")
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            for row in reader:
                where = {"file": em.label, "line": reader.line_num}
                if not row or not any(c.strip() for c in row):
                    em.out.count("blank_lines")
                    continue
                if len(row) > len(header):
                    em.reject(
                        "bad_csv_row", f"{len(row)} fields, the header has {len(header)}", delimiter.join(row), where
                    )
                    continue
                em.record(dict(zip(header, row)), where)
        except UnicodeDecodeError as e:
            em.reject("invalid_utf8", str(e), None, {"file": em.label, "line": reader.line_num})
        except csv.Error as e:
            em.reject("bad_csv_row", str(e), None, {"file": em.label, "line": reader.line_num})


def _read_text(path: str, em: RecordEmitter) -> None:
    where = {"file": em.label}
    with _open_binary(path) as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return em.reject("invalid_utf8", str(e), raw.decode("utf-8", "replace"), where)
    em.record({em.cfg.text_field: text, em.cfg.id_field: stable_id(em.label)}, where)


def _read_hf_dataset(path: str, em: RecordEmitter) -> None:
    import datasets

    loaded = datasets.load_from_disk(path)
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, ds in sorted(splits, key=lambda kv: kv[0] or ""):
        extra = {"split": split} if split else {}

        def rows(ds=ds) -> Iterator[dict[str, Any]]:
            for batch in ds.iter(batch_size=em.cfg.batch_rows):
                cols = list(batch)
                n = len(batch[cols[0]]) if cols else 0
                for i in range(n):
                    yield {c: batch[c][i] for c in cols}

        _read_records(rows(), em, extra)


class IngestStage(Stage):
    name = "ingest"
    version = 1
    Config = IngestConfig
    emitter = RecordEmitter  # what turns a record into a document or a reject (sft_ingest brings its own)
    balanced = True
    unique_ids = True
    shard_cut = "id"  # shards end where the ids say and with a large file: files added later leave them as they were

    def sources(self, cfg: IngestConfig) -> list[dict[str, Any]]:
        return [
            {"path": u["abspath"], "format": u["format"], "size": u["size"], "mtime_ns": u["mtime_ns"]}
            for u in resolve_inputs(cfg)
        ]

    def plan(self, inputs: list[Artifact], cfg: IngestConfig) -> list[dict[str, Any]]:
        """Files in order, grouped so that many small files do not become many tiny tasks and shards."""
        units: list[dict[str, Any]] = []
        group: list[dict[str, Any]] = []
        size = 0
        for f in resolve_inputs(cfg):
            if group and (size + f["size"] > cfg.unit_mb << 20 or len(group) >= cfg.unit_files):
                units.append({"files": group})
                group, size = [], 0
            group.append(f)
            size += f["size"]
        if group:
            units.append({"files": group})
        return units

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: IngestConfig) -> str:
        """A unit's documents depend on its own files (path, format, size, mtime) and on how records are
        read, not on which other files the config lists: an artifact made after files were added copies
        the units whose files are unchanged (files over `unit_mb` are a unit each)."""
        reading = {k: v for k, v in cfg.fingerprint_config().items() if k != "paths"}
        return fingerprint(f"{self.name}.unit", self.version, {"config": reading, "unit": unit})

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: IngestConfig, out: ArtifactWriter) -> None:
        for f in unit["files"]:
            self._read_file(f, cfg, out)
            out.end_of_item()

    def _read_file(self, unit: dict[str, Any], cfg: IngestConfig, out: ArtifactWriter) -> None:
        out.stats.bytes_in += unit["size"]
        em = self.emitter(cfg, out, cfg.source or unit["path"])
        path, fmt = unit["path"], unit["format"]
        try:
            if fmt == "jsonl":
                _read_jsonl(path, em)
            elif fmt == "json":
                _read_json(path, em)
            elif fmt == "csv":
                _read_csv(path, em)
            elif fmt == "parquet":
                _read_records(_iter_parquet(path, cfg.batch_rows), em, {})
            elif fmt == "text":
                _read_text(path, em)
            elif fmt == "hf_dataset":
                _read_hf_dataset(path, em)
            else:  # the config model only admits the formats above
                raise ValueError(f"unknown format {fmt!r}")
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            em.reject("unreadable_file", f"{type(e).__name__}: {e}", None, {"file": em.label})
        em.flush()
        out.count("files")
