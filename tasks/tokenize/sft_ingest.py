"""sft_ingest: instruction data files (Alpaca JSON / JSONL, chat `messages`) -> documents.

The generic ingest stage wants a text field, which an Alpaca record does not have. This stage reads
the same file formats with the same readers, validates each record as an instruction example, and
writes a document whose `text` is the example's plain words (so text filters such as dedup or langid
can run on instruction data too) and whose `meta["sft"]` holds the normalised example that
`tokenize` (format: sft) formats and masks. A record that is not a usable example is rejected with a
reason: missing or non-text fields, empty fields, malformed turns, no assistant reply.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from pydantic import Field

from tasks.artifacts import ArtifactWriter, StageStats
from tasks.documents import meta_json, stable_id
from tasks.ingest.stage import (
    IngestConfig,
    IngestStage,
    _Emitter,
    _iter_parquet,
    _preview,
    _read_hf_dataset,
    _read_json,
    _read_jsonl,
    _read_records,
    _read_text,
)
from tasks.tokenize.sft import (
    SftFields,
    SftRecordError,
    normalize_sft_record,
    plain_text,
)


class SftIngestConfig(IngestConfig):
    """Where the instruction examples come from, and which record fields hold their parts."""

    instruction_field: str = Field("instruction", description="Alpaca: the task.")
    input_field: str = Field("input", description="Alpaca: optional context for the task.")
    output_field: str = Field("output", description="Alpaca: the reply the model learns.")
    messages_field: str = Field(
        "messages", description="Chat: list of {role, content} turns (ShareGPT {from, value} is read too)."
    )

    def sft_fields(self) -> SftFields:
        return SftFields(self.instruction_field, self.input_field, self.output_field, self.messages_field)


class _SftEmitter(_Emitter):
    """Records become documents when they are instruction examples, rejects with a reason otherwise."""

    cfg: SftIngestConfig

    def record(self, rec: Any, where: dict[str, Any]) -> None:
        cfg = self.cfg
        try:
            example = normalize_sft_record(rec, cfg.sft_fields())
        except SftRecordError as e:
            return self.reject(e.reason, e.detail, _preview(rec), where)
        raw_id = rec.get(cfg.id_field)
        doc_id = str(raw_id) if raw_id is not None else stable_id(self.label, json.dumps(where, sort_keys=True))
        url = rec.get(cfg.url_field) if isinstance(rec.get(cfg.url_field), str) else None
        lang = rec.get(cfg.lang_field) if isinstance(rec.get(cfg.lang_field), str) else None
        taken = {cfg.id_field, cfg.url_field, cfg.lang_field, cfg.instruction_field, cfg.input_field,
                 cfg.output_field, cfg.messages_field}
        meta = {k: v for k, v in rec.items() if k not in taken}
        meta["sft"] = example
        meta["_ingest"] = where
        text = plain_text(example)
        try:
            meta_str = meta_json(meta)
            meta_str.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON escapes cannot be stored as UTF-8
            return self.reject("invalid_utf8", str(e), None, where)
        self.stats.rows_in += 1
        self.stats.rows_out += 1
        self.out.write(self.docs.add(id=doc_id, text=text, source=self.label, url=url, lang=lang, meta=meta_str))


class SftIngestStage(IngestStage):
    name = "sft_ingest"
    version = 1
    Config = SftIngestConfig

    def _read_file(self, unit: dict[str, Any], cfg: SftIngestConfig, out: ArtifactWriter, stats: StageStats) -> None:
        stats.bytes_in += unit["size"]
        em = _SftEmitter(cfg, out, cfg.source or unit["path"], stats)
        path, fmt = unit["path"], unit["format"]
        try:
            if fmt == "jsonl":
                _read_jsonl(path, em)
            elif fmt == "json":
                _read_json(path, em)
            elif fmt == "parquet":
                _read_records(_iter_parquet(path, cfg.batch_rows), em, {})
            elif fmt == "text":  # a text file is no instruction example: rejected as such, with a reason
                _read_text(path, em)
            elif fmt == "hf_dataset":
                _read_hf_dataset(path, em)
            else:
                raise ValueError(f"unknown format {fmt!r}")
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            em.reject("unreadable_file", f"{type(e).__name__}: {e}", None, {"file": em.label})
        em.flush()
        stats.extra["files"] = stats.extra.get("files", 0) + 1
