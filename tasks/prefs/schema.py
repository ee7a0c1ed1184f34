"""The tables of preference work: prompts, generated candidates, scored candidates, preference pairs.

A prompt is a conversation that ends with a user turn, stored as JSON: a list of
`{"role": "system" | "user" | "assistant", "content": str}`. A reply is the assistant's text that
follows it. Prompts themselves are documents (the document schema; `text` is the prompt's words,
`meta["prompt"]` its messages), so text filters run on them like on any document.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # <prompt id>#<sample>
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # JSON messages
        pa.field("reply", pa.string(), nullable=False),
        pa.field("finished", pa.string(), nullable=False),  # "eos": the model ended it; "length": cut at max_new_tokens
        pa.field("n_tokens", pa.int32(), nullable=False),
    ]
)
SCORED_SCHEMA = CANDIDATES_SCHEMA.append(pa.field("score", pa.float64(), nullable=False))

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # JSON messages
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_score", pa.float64()),
        pa.field("rejected_score", pa.float64()),
        pa.field("source", pa.string()),
        pa.field("meta", pa.string()),  # a JSON object, as a string
    ]
)


def messages_json(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def load_messages(raw: str) -> list[dict[str, str]]:
    return json.loads(raw)


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The prompt's words, for filters and reports: the turns' contents, one per line."""
    return "\n".join(str(m.get("content", "")) for m in messages)
