"""An append-only JSON Lines journal: what a crawl has decided so far, so a killed crawl can resume.

Each record is one line written with one write() and flushed to the OS, so a SIGKILL loses at most
the line being written; `load` drops such a torn tail. Records are read back by byte offset, which
lets the final pass emit documents in sorted order while holding only the index in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


class Journal:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = None
        self._reader = None

    def load(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, record) for every complete record, streamed; once consumed to the end, a torn or
        garbled tail is cut off so that appends continue from the last good record."""
        if not os.path.exists(self.path):
            return
        good_end = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(line)
                except ValueError:
                    break
                yield good_end, rec
                good_end += len(line)
        if good_end != os.path.getsize(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def append(self, record: dict[str, Any]) -> int:
        """Write one record; returns its offset."""
        if self._file is None:
            self._file = open(self.path, "ab")
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n"
        offset = self._file.tell()
        self._file.write(line)
        self._file.flush()
        return offset

    def read_at(self, offset: int) -> dict[str, Any]:
        if self._file is not None:
            self._file.flush()
        if self._reader is None:
            self._reader = open(self.path, "rb")
        self._reader.seek(offset)
        return json.loads(self._reader.readline())

    def close(self) -> None:
        for f in (self._file, self._reader):
            if f is not None:
                f.close()
        self._file = self._reader = None
