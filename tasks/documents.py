"""The document schema every data stage reads and writes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from tasks.artifacts.write import MAX_REJECT_TEXT_CHARS, REJECT_SCHEMA, RowBatcher

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("meta", pa.string()),  # a JSON object, as a string
    ]
)
DOCUMENT_FIELDS = tuple(DOCUMENT_SCHEMA.names)

__all__ = [
    "DOCUMENT_FIELDS",
    "DOCUMENT_SCHEMA",
    "MAX_REJECT_TEXT_CHARS",
    "REJECT_SCHEMA",
    "DocumentBatcher",
    "meta_json",
    "parse_meta",
    "stable_id",
]

DocumentBatcher = RowBatcher  # documents are rows of DOCUMENT_SCHEMA


def stable_id(*parts: str) -> str:
    """A short deterministic id for a document that came without one."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:20]


def meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)


def parse_meta(raw: Any) -> dict[str, Any]:
    """A document's meta as a dict ({} when absent or not a JSON object; the raw value under `_meta`
    when it is JSON of another type or not JSON at all)."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError):
        return {"_meta": raw}
    return meta if isinstance(meta, dict) else {"_meta": meta}
