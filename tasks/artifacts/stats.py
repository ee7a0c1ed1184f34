"""What a stage did, per unit and in sum: rows in / out, rejects by reason, bytes, seconds, counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageStats:
    """A unit's (or an artifact's) accounting. For a stage that keeps or drops what it reads,
    rows_in == rows_out + rows_rejected; the shared reader, writer and reject path keep it so."""

    rows_in: int = 0
    rows_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n

    def count(self, key: str, n: int | float = 1) -> None:
        """Add to a named counter in `extra` (summed over units at commit)."""
        self.extra[key] = self.extra.get(key, 0) + n

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def merge(self, other: StageStats) -> StageStats:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        for k, v in other.rejected.items():
            self.reject(k, v)
        for k, v in other.extra.items():
            if (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and isinstance(self.extra.get(k, 0), (int, float))
            ):
                self.extra[k] = self.extra.get(k, 0) + v
            else:
                self.extra.setdefault(k, v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_rejected": self.rows_rejected,
            "rejected": dict(sorted(self.rejected.items())),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStats:
        return cls(
            rows_in=d.get("rows_in", 0),
            rows_out=d.get("rows_out", 0),
            rejected=dict(d.get("rejected", {})),
            bytes_in=d.get("bytes_in", 0),
            bytes_out=d.get("bytes_out", 0),
            seconds=d.get("seconds", 0.0),
            extra=dict(d.get("extra", {})),
        )
