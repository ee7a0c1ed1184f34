"""The document schema every data stage reads and writes, and the schema of rejected rows."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

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

# A rejected row keeps whatever could be recovered of the document plus why it was dropped.
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


def stable_id(*parts: str) -> str:
    """A short deterministic id for a document that came without one."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:20]


def meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)


class DocumentBatcher:
    """Accumulates documents (or rejects) as columns and hands out Arrow batches of a bounded size."""

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
