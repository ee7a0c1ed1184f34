"""The crawl stage: web crawls, WARC files and code trees -> documents, plus a per-host crawl report.

A source stage (no input artifacts). Units: one per web source (its frontier is global to it), one per
WARC file, one per code tree. Everything looked at and not kept is a reject row with a reason, so
rows_in == rows_out + rows_rejected holds per unit; the `report` table has one row per source and host.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, ClassVar

from tasks.artifacts import Artifact, ArtifactWriter, fingerprint
from tasks.crawl.code import ingest_code, public_url, remote_commit, tree_identity
from tasks.crawl.config import CodeSource, CrawlConfig, WarcSource, WebSource
from tasks.crawl.extract import Extractor
from tasks.crawl.report import CrawlReport
from tasks.crawl.urls import host_of, normalize_url
from tasks.crawl.warc import ingest_warc, resolve_warc_files
from tasks.crawl.web import crawl_web
from tasks.stage import Stage, StageInputError

REPORT_TABLE = "report"
_REMOTE_TTL_S = 600.0
_remote_commits: dict[tuple[str, str | None], tuple[float, str]] = {}


def source_label(src: WebSource | WarcSource | CodeSource) -> str:
    if src.name:
        return src.name
    if isinstance(src, WebSource):
        return "web:" + host_of(normalize_url(src.seeds[0]) or src.seeds[0])
    if isinstance(src, WarcSource):
        return "warc:" + os.path.basename(src.paths[0].rstrip("/"))
    if src.git_url:
        return "code:" + os.path.basename(public_url(src.git_url).rstrip("/")).removesuffix(".git")
    return "code:" + os.path.basename(os.path.abspath(src.path))


def _commit_of(src: CodeSource, where: str) -> str:
    """The remote commit a git_url source reads, looked up once per few minutes: plan() and the
    fingerprint must agree on it."""
    key = (src.git_url, src.ref)
    now = time.monotonic()
    cached = _remote_commits.get(key)
    if cached and now - cached[0] < _REMOTE_TTL_S:
        return cached[1]
    commit = remote_commit(src.git_url, src.ref, where)
    _remote_commits[key] = (now, commit)
    return commit


def _check_labels(cfg: CrawlConfig) -> None:
    seen: dict[str, int] = {}
    for i, src in enumerate(cfg.sources):
        label = source_label(src)
        if label in seen:
            raise StageInputError(
                f"sources[{i}].name",
                f"source name {label!r} is also sources[{seen[label]}]'s; give each a distinct name",
            )
        seen[label] = i


class CrawlStage(Stage):
    name = "crawl"
    version = 1
    Config = CrawlConfig
    report_tables: ClassVar[tuple[str, ...]] = (REPORT_TABLE,)
    balanced = True
    unique_ids = True
    shard_cut = "id"  # pages and files come sorted; shards end where the ids say, so a new page changes one shard

    def sources(self, cfg: CrawlConfig) -> list[dict[str, Any]]:
        _check_labels(cfg)
        identity: list[dict[str, Any]] = []
        for i, src in enumerate(cfg.sources):
            where = f"sources[{i}]"
            if isinstance(src, WebSource):
                identity.append({"kind": "web", "snapshot": src.snapshot})
            elif isinstance(src, WarcSource):
                identity.append({"kind": "warc", "files": resolve_warc_files(src, where)})
            elif src.git_url:
                identity.append({"kind": "code", "git_url": public_url(src.git_url), "commit": _commit_of(src, where)})
            else:
                if not os.path.isdir(src.path):
                    raise StageInputError(f"{where}.path", f"no such directory: {src.path!r}")
                identity.append({"kind": "code", **tree_identity(src.path, src)})
        return identity

    def plan(self, inputs: list[Artifact], cfg: CrawlConfig) -> list[dict[str, Any]]:
        _check_labels(cfg)
        units: list[dict[str, Any]] = []
        for i, src in enumerate(cfg.sources):
            where = f"sources[{i}]"
            if isinstance(src, WarcSource):
                units += [{"source": i, "kind": "warc", "file": f} for f in resolve_warc_files(src, where)]
            elif isinstance(src, CodeSource):
                units.append({"source": i, "kind": "code", "commit": _commit_of(src, where) if src.git_url else None})
            else:
                units.append({"source": i, "kind": "web"})
        return units

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: CrawlConfig) -> str:
        """A unit's output depends on its own source only: its settings and label, and its identity (the
        web source's snapshot, the WARC file's size and mtime, the code tree's commit and files). So an
        unchanged source is copied from the crawl artifact that has it, even when another source of the
        same config changed. Bump a web source's `snapshot` to fetch it again."""
        src = cfg.sources[unit["source"]]
        identity: Any = None
        if isinstance(src, CodeSource) and not src.git_url:
            identity = tree_identity(src.path, src)
        own = {k: v for k, v in unit.items() if k != "source"}
        return fingerprint(
            "crawl.unit",
            self.version,
            {"source": src.fingerprint_config(), "label": source_label(src), "unit": own},
            sources=identity,
        )

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: CrawlConfig, out: ArtifactWriter) -> None:
        src = cfg.sources[unit["source"]]
        label = source_label(src)
        report = CrawlReport(label)
        with Extractor(cfg.extraction_processes()) as extractor:
            if isinstance(src, WebSource):
                # The journal lives in the unit's scratch directory, which survives a killed attempt;
                # on a store without one (object storage) the crawl cannot resume, only restart.
                tmp = None if out.scratch else tempfile.mkdtemp(prefix="kiln-crawl-")
                try:
                    journal = os.path.join(out.scratch or tmp, "web-journal.jsonl")
                    crawl_web(src, label, journal, extractor, out, report, cfg.batch_rows)
                finally:
                    if tmp:
                        shutil.rmtree(tmp, ignore_errors=True)
                totals = report.totals()
                out.stats.extra["web_requests"] = totals["requests"]
                out.stats.extra["web_hosts"] = totals["hosts"]
            elif isinstance(src, WarcSource):
                ingest_warc(unit["file"], src, label, extractor, out, report, cfg.batch_rows)
            else:
                ingest_code(src, unit, label, out, report, cfg.batch_rows)
        out.table(REPORT_TABLE).write(report.table())
