"""Append-only JSON-lines journals: one record a line, appended as it happens, read back whole.

The human-feedback answers (tasks/prefs/feedback.py) and an HPO trial's streamed validation values
(flows/hpo/study.py) are kept this way: a kill can cut the last line short, and that line was never
complete (nor acknowledged), so a reader skips it.
"""

from __future__ import annotations

import json
import os
from typing import Any


def append(path: str, record: dict[str, Any], sync: bool = False) -> None:
    """Append one record; `sync` waits until it is on disk (an answer acknowledged to a person)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if sync:
            f.flush()
            os.fsync(f.fileno())


def read(path: str | None) -> list[dict[str, Any]]:
    """The whole records in order (none if the journal does not exist); a line cut short is skipped."""
    out: list[dict[str, Any]] = []
    if path is None or not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out
