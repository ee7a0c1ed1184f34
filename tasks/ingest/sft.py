"""sft_ingest: instruction data files (Alpaca JSON / JSONL, chat `messages`) -> documents.

The generic ingest stage wants a text field, which an Alpaca record does not have. This stage reads
the same file formats with the same readers, validates each record as an instruction example, and
writes a document whose `text` is the example's plain words (so text filters such as dedup or langid
can run on instruction data too) and whose `meta["sft"]` holds the normalised example that
`tokenize` (format: sft) formats and masks. A record that is not a usable example is rejected with a
reason: missing or non-text fields, empty fields, malformed turns, no assistant reply.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tasks.documents import meta_json
from tasks.ingest.stage import IngestConfig, IngestStage, RecordEmitter, preview_record
from tasks.tokenize.sft import SftFields, SftRecordError, normalize_sft_record, plain_text


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


class SftRecordEmitter(RecordEmitter):
    """Records become documents when they are instruction examples, rejects with a reason otherwise."""

    cfg: SftIngestConfig

    def record(self, rec: Any, where: dict[str, Any]) -> None:
        cfg = self.cfg
        try:
            example = normalize_sft_record(rec, cfg.sft_fields())
        except SftRecordError as e:
            return self.reject(e.reason, e.detail, preview_record(rec), where)
        url = rec.get(cfg.url_field) if isinstance(rec.get(cfg.url_field), str) else None
        lang = rec.get(cfg.lang_field) if isinstance(rec.get(cfg.lang_field), str) else None
        taken = {
            cfg.id_field,
            cfg.url_field,
            cfg.lang_field,
            cfg.instruction_field,
            cfg.input_field,
            cfg.output_field,
            cfg.messages_field,
        }
        meta = {k: v for k, v in rec.items() if k not in taken}
        meta["sft"] = example
        meta["_ingest"] = where
        try:
            meta_str = meta_json(meta)
            meta_str.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON escapes cannot be stored as UTF-8
            return self.reject("invalid_utf8", str(e), None, where)
        self.keep(
            id=self.document_id(rec, where),
            text=plain_text(example),
            source=self.label,
            url=url,
            lang=lang,
            meta=meta_str,
        )


class SftIngestStage(IngestStage):
    name = "sft_ingest"
    version = 1
    Config = SftIngestConfig
    emitter = SftRecordEmitter
