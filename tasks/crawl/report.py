"""The crawl report: per source and host, what was requested, kept and dropped, and why.

Written as the artifact's `report` table (one row per source and host) so that the flow can publish
it as a Prefect table artifact and `kiln inspect --table report` can show it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

REPORT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("host", pa.string()),  # a URL's host[:port]; a repository label for code sources
        pa.field("requests", pa.int64()),  # HTTP requests sent, robots.txt, redirect hops and retries included
        pa.field("rows", pa.int64()),  # URLs / records / files decided: documents + rejected
        pa.field("documents", pa.int64()),
        pa.field("rejected", pa.int64()),
        pa.field("robots_denied", pa.int64()),
        pa.field("bytes", pa.int64()),  # bytes received (decoded body bytes)
        pa.field("mean_latency_ms", pa.float64()),
        pa.field("max_latency_ms", pa.float64()),
        pa.field("rejected_by_reason", pa.string()),  # JSON object reason -> count
        pa.field("status_counts", pa.string()),  # JSON object HTTP status -> count
    ]
)


@dataclass
class HostFigures:
    requests: int = 0
    rows: int = 0
    documents: int = 0
    bytes: int = 0
    latency_sum: float = 0.0
    latency_max: float = 0.0
    latency_n: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)


class CrawlReport:
    def __init__(self, source: str):
        self.source = source
        self.hosts: dict[str, HostFigures] = {}

    def _host(self, host: str) -> HostFigures:
        return self.hosts.setdefault(host or "(none)", HostFigures())

    def request(self, host: str, status: int | None, nbytes: int, latency_ms: float | None, attempts: int = 1) -> None:
        h = self._host(host)
        h.requests += attempts
        h.bytes += nbytes
        if status is not None:
            h.statuses[str(status)] = h.statuses.get(str(status), 0) + 1
        if latency_ms is not None:
            h.latency_sum += latency_ms
            h.latency_n += 1
            h.latency_max = max(h.latency_max, latency_ms)

    def row(self, host: str, reason: str | None) -> None:
        """One decided row: a document (reason None) or a reject."""
        h = self._host(host)
        h.rows += 1
        if reason is None:
            h.documents += 1
        else:
            h.reasons[reason] = h.reasons.get(reason, 0) + 1

    def totals(self) -> dict[str, Any]:
        return {
            "requests": sum(h.requests for h in self.hosts.values()),
            "bytes": sum(h.bytes for h in self.hosts.values()),
            "hosts": len(self.hosts),
        }

    def table(self) -> pa.Table:
        rows = []
        for host in sorted(self.hosts):
            h = self.hosts[host]
            rows.append(
                {
                    "source": self.source,
                    "host": host,
                    "requests": h.requests,
                    "rows": h.rows,
                    "documents": h.documents,
                    "rejected": h.rows - h.documents,
                    "robots_denied": h.reasons.get("robots_denied", 0),
                    "bytes": h.bytes,
                    "mean_latency_ms": round(h.latency_sum / h.latency_n, 2) if h.latency_n else None,
                    "max_latency_ms": round(h.latency_max, 2) if h.latency_n else None,
                    "rejected_by_reason": json.dumps(dict(sorted(h.reasons.items()))),
                    "status_counts": json.dumps(dict(sorted(h.statuses.items()))),
                }
            )
        return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)
