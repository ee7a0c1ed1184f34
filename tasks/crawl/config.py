"""The crawl stage's config: a list of sources, each a pydantic model picked by its `kind`.

Fields that change how politely or how fast a source is read, not what it yields (concurrency,
per-host delay, retries, worker processes), are left out of the fingerprint, so tuning them keeps a
finished crawl cached.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.stage import StageConfig

DEFAULT_USER_AGENT = "KilnBot/0.1 (+https://github.com/kiln-llm/kiln; research crawler)"
DEFAULT_CONTENT_TYPES = ["text/html", "application/xhtml+xml", "text/plain"]


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    execution_fields: ClassVar[frozenset[str]] = frozenset()

    name: str | None = Field(None, description="Source label written to every document's `source` column.")

    def fingerprint_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.execution_fields))


def _compiled(patterns: list[str]) -> list[str]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{p!r} is not a valid regular expression: {e}") from None
    return patterns


class _FetchedSource(_Source):
    """What web pages and WARC records share: URL regexes and the media types kept."""

    @field_validator("include", "exclude", check_fields=False)
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return _compiled(v)

    @field_validator("content_types", check_fields=False)
    @classmethod
    def _media_types(cls, v: list[str]) -> list[str]:
        return [t.split(";")[0].strip().lower() for t in v]


class WebSource(_FetchedSource):
    """A polite breadth-first crawl from seed URLs, bounded by scope, depth and a page budget."""

    execution_fields = frozenset(
        {"concurrency", "per_host_concurrency", "per_host_delay", "page_retries", "retry_backoff"}
    )

    kind: Literal["web"] = "web"
    seeds: list[str] = Field(..., min_length=1, description="Start URLs (http or https).")
    allowed_domains: list[str] = Field(
        [],
        description="Hosts the crawl may visit (a domain also admits its subdomains; 'host:port' pins a port). "
        "Empty: the seeds' hosts.",
    )
    include: list[str] = Field([], description="Regexes; when given, a URL must match one of them to be crawled.")
    exclude: list[str] = Field([], description="Regexes; a URL matching any of them is not crawled.")
    max_depth: int = Field(3, ge=0, le=100, description="Links followed from a seed, at most (seeds are depth 0).")
    max_pages: int = Field(1000, ge=1, description="URLs requested, at most (robots.txt requests not counted).")
    user_agent: str = Field(DEFAULT_USER_AGENT, min_length=1, description="User-Agent header and robots.txt agent.")
    respect_robots: bool = Field(True, description="Fetch and honour robots.txt (rules and Crawl-delay) per host.")
    respect_nofollow: bool = Field(True, description="Skip rel=nofollow links and pages marked <meta robots nofollow>.")
    concurrency: int = Field(32, ge=1, le=1024, description="Requests in flight over all hosts.")
    per_host_concurrency: int = Field(2, ge=1, le=64, description="Requests in flight to one host.")
    per_host_delay: float = Field(
        0.5, ge=0, le=3600, description="Seconds between request starts to one host (robots Crawl-delay raises it)."
    )
    max_crawl_delay: float = Field(
        60.0, ge=0, description="A host whose robots.txt asks for a longer Crawl-delay than this is skipped."
    )
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to open a connection.")
    read_timeout: float = Field(20.0, gt=0, description="Seconds to wait for the next bytes of a response.")
    page_timeout: float = Field(60.0, gt=0, description="Seconds for a whole response, body included.")
    max_redirects: int = Field(5, ge=0, le=30, description="Redirect hops followed per URL.")
    max_body_bytes: int = Field(5 << 20, ge=1024, description="Larger responses are dropped as too_large.")
    content_types: list[str] = Field(
        DEFAULT_CONTENT_TYPES, min_length=1, description="Media types kept; others are recorded as skipped."
    )
    allow_private: bool = Field(
        False, description="Allow loopback, private and link-local addresses (off: refused, against SSRF)."
    )
    sort_query: bool = Field(False, description="Sort query parameters when normalising URLs.")
    page_retries: int = Field(1, ge=0, le=10, description="Retries of a URL after a timeout, a 429 or a 5xx.")
    retry_backoff: float = Field(1.0, ge=0, description="Seconds before the first retry; doubles after each.")
    extraction_fallback: bool = Field(
        False, description="Let trafilatura compare with its fallback extractors (better recall, ~2x slower)."
    )
    snapshot: str = Field(
        "", description="Any label; change it to recrawl (the web is not versioned, so the cache keys on this)."
    )

    @field_validator("seeds")
    @classmethod
    def _http_seeds(cls, seeds: list[str]) -> list[str]:
        for s in seeds:
            parts = urlsplit(s.strip())
            if parts.scheme.lower() not in ("http", "https"):
                raise ValueError(f"{s!r}: only http and https URLs can be crawled (file:// and others are refused)")
            if not parts.hostname:
                raise ValueError(f"{s!r}: no host")
        return [s.strip() for s in seeds]

    @field_validator("allowed_domains")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [d.strip().lower().lstrip(".") for d in v if d.strip()]


class WarcSource(_FetchedSource):
    """WARC / WARC.gz files (Common Crawl's WARC and WET): response records through the same extraction."""

    kind: Literal["warc"] = "warc"
    paths: list[str] = Field(
        ..., min_length=1, description="Local paths, globs, or fsspec URLs (s3://commoncrawl/..., https://...)."
    )
    content_types: list[str] = Field(DEFAULT_CONTENT_TYPES, min_length=1, description="Media types kept.")
    include: list[str] = Field([], description="Regexes on the target URI; when given, one must match.")
    exclude: list[str] = Field([], description="Regexes on the target URI; a match drops the record.")
    max_body_bytes: int = Field(5 << 20, ge=1024, description="Larger payloads are dropped as too_large.")
    extraction_fallback: bool = Field(False, description="See the web source.")


DEFAULT_VENDORED_DIRS = [
    "vendor",
    "vendored",
    "third_party",
    "thirdparty",
    "external",
    "extern",
    "node_modules",
    "bower_components",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "venv",
    "env",
    "build",
    "dist",
    "target",
    "out",
]


class CodeSource(_Source):
    """Source files of a git repository or directory (or a git URL, cloned shallowly)."""

    execution_fields = frozenset()

    kind: Literal["code"] = "code"
    path: str | None = Field(None, description="A local directory or git working tree.")
    git_url: str | None = Field(None, description="A git URL to clone (needs network unless it is a local path).")
    ref: str | None = Field(None, description="Branch or tag of git_url (default: the remote HEAD).")
    include: list[str] = Field(["**/*.py"], min_length=1, description="Globs relative to the root (** crosses dirs).")
    exclude: list[str] = Field([], description="Globs of files not to read.")
    vendored_dirs: list[str] = Field(
        DEFAULT_VENDORED_DIRS, description="Directory names skipped as vendored or generated, wherever they appear."
    )
    skip_hidden: bool = Field(True, description="Skip hidden files and directories (.git, .venv, .tox, ...).")
    use_gitignore: bool = Field(True, description="In a git tree, list files with git (honours .gitignore).")
    max_file_bytes: int = Field(1 << 20, ge=1, description="Larger files are skipped as oversized.")
    max_line_chars: int = Field(1000, ge=80, description="A file with a longer line is skipped as generated/minified.")
    license: str | None = Field(None, description="SPDX id for every file; default: detected per repo/file.")

    @model_validator(mode="after")
    def _one_root(self) -> CodeSource:
        if (self.path is None) == (self.git_url is None):
            raise ValueError("give exactly one of path and git_url")
        if self.ref and not self.git_url:
            raise ValueError("ref only applies to git_url")
        return self


CrawlSource = Annotated[WebSource | WarcSource | CodeSource, Field(discriminator="kind")]


class CrawlConfig(StageConfig):
    """Where the text comes from: web crawls, WARC files and code trees, in one stage."""

    execution_fields = StageConfig.execution_fields | {"batch_rows", "extract_workers"}

    sources: list[CrawlSource] = Field(..., min_length=1, description="The sources, each with a `kind`.")
    batch_rows: int = Field(512, ge=1, description="Documents per Arrow batch written.")
    extract_workers: int | None = Field(
        None,
        ge=0,
        le=256,
        description="Processes for HTML-to-text extraction (0: a thread of the stage's process). Default: one "
        "per CPU core but one, which the crawl's own event loop keeps busy.",
    )

    def extraction_processes(self) -> int:
        if self.extract_workers is not None:
            return self.extract_workers
        return max(1, (os.cpu_count() or 2) - 1)

    def fingerprint_config(self) -> dict[str, Any]:
        cfg = super().fingerprint_config()
        cfg["sources"] = [s.fingerprint_config() for s in self.sources]
        return cfg
