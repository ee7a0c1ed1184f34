"""The web crawler: level-synchronous breadth-first, polite, resumable.

Why levels: the set of pages a crawl keeps must not depend on which response came back first, or a
rerun (or a resumed run) would keep different pages. So the frontier advances a depth at a time: all
URLs of depth d are known before any is fetched, sorted, cut to the page budget, and journaled as one
`level` record; pages then fetch concurrently and each is journaled as it completes. The next level
is computed from the journal alone. A crawl killed at any moment resumes from the last level record,
skips the pages already journaled, and ends with the same documents an uninterrupted crawl makes.

Politeness per host (scheme://host:port): robots.txt fetched once and honoured for the configured
User-Agent (rules, Crawl-delay, Request-rate); at most `per_host_concurrency` requests in flight; request
starts at least `per_host_delay` apart. Redirects are followed by hand so every hop is checked for
scope, address safety and robots like a link would be.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import certifi
import httpx
from protego import Protego

from tasks.artifacts import ArtifactWriter
from tasks.crawl.config import WebSource
from tasks.crawl.extract import Extractor, parse_content_type
from tasks.crawl.journal import Journal
from tasks.crawl.report import CrawlReport
from tasks.crawl.urls import CRAWLABLE_SCHEMES, Scope, address_problem, host_of, normalize_url, origin_of, scheme_of
from tasks.documents import DOCUMENT_SCHEMA, DocumentBatcher, meta_json, stable_id

log = logging.getLogger("kiln.crawl")

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: parse at least the first 500 KiB
ROBOTS_MAX_REDIRECTS = 5
MAX_RETRY_WAIT = 60.0


@dataclass
class Hop:
    """The outcome of one request (after its retries)."""

    url: str
    status: int | None = None
    media_type: str = ""
    charset: str | None = None
    location: str | None = None
    body: bytes | None = None
    reason: str | None = None  # why nothing usable came back
    detail: str | None = None
    bytes: int = 0
    latency_ms: float | None = None
    attempts: int = 1
    retry_after: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "bytes": self.bytes,
            "latency_ms": self.latency_ms,
            "attempts": self.attempts,
        }

    @property
    def retryable(self) -> bool:
        return self.reason in ("timeout", "connection_error") or self.status in RETRY_STATUSES


class HostState:
    """Politeness state of one origin."""

    def __init__(self, origin: str, concurrency: int, delay: float):
        self.origin = origin
        self.slots = asyncio.Semaphore(concurrency)
        self.start_lock = asyncio.Lock()
        self.last_start = float("-inf")
        self.delay = delay  # may grow once robots.txt is read; it applies from the last start on
        self.prepared: asyncio.Future | None = None
        self.problem: tuple[str, str] | None = None  # (reason, detail) refusing every URL of the host
        self.robots: Protego | None = None
        self.client: httpx.AsyncClient | None = None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


class WebCrawler:
    def __init__(self, src: WebSource, label: str, journal: Journal, extractor: Extractor):
        self.src = src
        self.label = label
        self.journal = journal
        self.extractor = extractor
        self.scope = Scope.for_seeds(src.seeds, src.allowed_domains, src.include, src.exclude)
        self.hosts: dict[str, HostState] = {}
        self.robots_records: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()  # every URL decided: in a level, skipped, or reached by a redirect
        self.in_levels: set[str] = set()  # URLs fetched directly (now or in an earlier level)
        self.budget_used = 0
        self.depth = -1
        self.level: list[str] = []
        self.done: set[str] = set()  # URLs of the current level already journaled
        self.level_links: dict[str, str] = {}  # link -> the (smallest) page it was found on
        self.level_reached: set[str] = set()  # redirect hops and final URLs of the current level
        self.resumed_pages = 0
        self.fetched_pages = 0
        self._tls_context: ssl.SSLContext | None = None

    # ---------------------------------------------------------------------------------------- resume

    def resume(self) -> None:
        """Rebuild the crawl's state from the journal of an earlier, unfinished attempt."""
        pages: list[dict[str, Any]] = []
        for _offset, rec in self.journal.load():
            t = rec.get("t")
            if t == "robots":
                self.robots_records[rec["origin"]] = rec
            elif t == "level":
                self.depth = rec["depth"]
                self.level = rec["urls"]
                self.in_levels.update(rec["urls"])
                self.seen.update(rec["urls"])
                self.seen.update(s[0] for s in rec["skipped"])
                self.budget_used += len(rec["urls"])
                pages = [p for p in pages if p["depth"] == self.depth]  # older levels are settled
            elif t == "page":
                rec.pop("text", None)
                pages.append(rec)
                self.resumed_pages += 1
                self.seen.update(h["url"] for h in rec["hops"])
        for rec in pages:
            if rec["depth"] == self.depth:
                self._absorb(rec)

    def _absorb(self, rec: dict[str, Any]) -> None:
        """Note a journaled page of the current level: done, and its links and redirects known."""
        self.done.add(rec["url"])
        for link in rec.get("links", ()):
            parent = self.level_links.get(link)
            if parent is None or rec["url"] < parent:
                self.level_links[link] = rec["url"]
        self.level_reached.update(h["url"] for h in rec["hops"])

    # ----------------------------------------------------------------------------------------- crawl

    async def run(self) -> None:
        src = self.src
        self.global_slots = asyncio.Semaphore(src.concurrency)
        if self.level or self.depth < 0:
            self.extractor.warm()
        try:
            if self.depth < 0:
                seeds: dict[str, str | None] = {}
                for s in src.seeds:
                    seeds[normalize_url(s, sort_query=src.sort_query) or s] = None
                await self._plan_level(seeds, 0)
            while self.level:
                await self._fetch_level()
                self.seen.update(self.level_reached)
                await self._plan_level(self.level_links, self.depth + 1)
        finally:
            await asyncio.gather(*(h.client.aclose() for h in self.hosts.values() if h.client is not None))

    def _client(self, host: HostState) -> httpx.AsyncClient:
        """One client per origin: httpx scans its whole connection pool for every request, so one big
        shared pool costs O(connections) per request; a pool per host stays as small as its limit."""
        if host.client is None:
            src = self.src
            host.client = httpx.AsyncClient(
                headers={
                    "User-Agent": src.user_agent,
                    "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.1",
                },
                timeout=httpx.Timeout(
                    connect=src.connect_timeout, read=src.read_timeout, write=src.read_timeout, pool=None
                ),
                limits=httpx.Limits(
                    max_connections=src.per_host_concurrency, max_keepalive_connections=src.per_host_concurrency
                ),
                follow_redirects=False,
                # Proxies from the environment would hide the real destination from the address check.
                trust_env=False,
                verify=self._tls(),
            )
        return host.client

    def _tls(self) -> ssl.SSLContext:
        """One TLS context for every host: building one loads the CA bundle (~30 ms each)."""
        if self._tls_context is None:
            self._tls_context = ssl.create_default_context(cafile=certifi.where())
        return self._tls_context

    async def _plan_level(self, candidates: dict[str, str | None], depth: int) -> None:
        src = self.src
        fresh = sorted(u for u in candidates if u not in self.seen)
        in_scope: list[str] = []
        skipped: list[list[Any]] = []
        for url in fresh:
            parent = candidates[url]
            scheme = scheme_of(url)
            if scheme not in CRAWLABLE_SCHEMES:
                skipped.append([url, "unsupported_scheme", f"{scheme or 'relative'}: URLs are not crawled", parent])
            elif normalize_url(url) is None:
                skipped.append([url, "bad_url", "cannot be parsed", parent])
            elif why := self.scope.why_not(url):
                skipped.append([url, "out_of_scope", why, parent])
            elif depth > src.max_depth:
                skipped.append([url, "max_depth", f"depth {depth} > max_depth {src.max_depth}", parent])
            else:
                in_scope.append(url)
        # Hosts are contacted (address check, robots.txt) only while the budget lasts; a refusal
        # then outranks the budget as the reason a URL is skipped.
        checked = bool(in_scope) and self.budget_used < src.max_pages
        if checked:
            await asyncio.gather(*(self._prepare_host(o) for o in sorted({origin_of(u) for u in in_scope})))
        level: list[str] = []
        for url in in_scope:
            parent = candidates[url]
            refusal = self._host_refusal(url) if checked else None
            if refusal:
                skipped.append([url, *refusal, parent])
            elif self.budget_used >= src.max_pages:
                skipped.append([url, "max_pages", f"page budget of {src.max_pages} spent", parent])
            else:
                level.append(url)
                self.budget_used += 1
        self.seen.update(fresh)
        self.in_levels.update(level)
        self.journal.append({"t": "level", "depth": depth, "urls": level, "skipped": skipped})
        self.depth, self.level = depth, level
        self.done, self.level_links, self.level_reached = set(), {}, set()
        if level or skipped:
            log.info("%s: depth %d: %d URL(s) to fetch, %d skipped", self.label, depth, len(level), len(skipped))

    def _host_refusal(self, url: str) -> tuple[str, str] | None:
        host = self.hosts[origin_of(url)]
        if host.problem:
            return host.problem
        if host.robots is not None and not host.robots.can_fetch(url, self.src.user_agent):
            return "robots_denied", f"robots.txt of {host.origin} disallows it for {self.src.user_agent!r}"
        return None

    async def _fetch_level(self) -> None:
        queues: dict[str, deque[str]] = {}
        for url in self.level:
            if url not in self.done:
                queues.setdefault(origin_of(url), deque()).append(url)
        # A resumed crawl meets these hosts fresh: their robots.txt (journaled, not fetched again)
        # must be applied before their first request, or its Crawl-delay would be forgotten.
        await asyncio.gather(*(self._prepare_host(origin) for origin in queues))

        async def worker(queue: deque[str]) -> None:
            while queue:
                rec = await self._visit(queue.popleft(), self.depth)
                self.journal.append(rec)
                self.fetched_pages += 1
                self._absorb(rec)

        workers = [worker(q) for q in queues.values() for _ in range(self.src.per_host_concurrency)]
        await asyncio.gather(*workers)

    # ----------------------------------------------------------------------------------------- hosts

    def _host(self, origin: str) -> HostState:
        if origin not in self.hosts:
            self.hosts[origin] = HostState(origin, self.src.per_host_concurrency, self.src.per_host_delay)
        return self.hosts[origin]

    async def _prepare_host(self, origin: str) -> HostState:
        """Address check and robots.txt, once per origin however many tasks ask at once."""
        host = self._host(origin)
        if host.prepared is None:
            host.prepared = asyncio.ensure_future(self._prepare(host))
        await host.prepared
        return host

    async def _prepare(self, host: HostState) -> None:
        problem = await address_problem(host.origin + "/", self.src.allow_private)
        if problem:
            host.problem = problem
            return
        if not self.src.respect_robots:
            return
        rec = self.robots_records.get(host.origin)
        if rec is None:
            rec = await self._fetch_robots(host)
            self.journal.append(rec)
            self.robots_records[host.origin] = rec
        self._apply_robots(host, rec)

    async def _fetch_robots(self, host: HostState) -> dict[str, Any]:
        url = host.origin + "/robots.txt"
        rec: dict[str, Any] = {
            "t": "robots",
            "origin": host.origin,
            "status": None,
            "body": None,
            "reason": None,
            "detail": None,
            "hops": [],
        }
        for n in itertools.count():
            hop = await self._request(url, robots=True)
            rec["hops"].append(hop.summary())
            rec["status"] = hop.status
            if hop.location is None:
                break
            target = normalize_url(hop.location, base=url)
            if n == ROBOTS_MAX_REDIRECTS or target is None or scheme_of(target) not in CRAWLABLE_SCHEMES:
                rec["reason"], rec["detail"] = "robots_redirects", f"gave up following to {hop.location!r}"
                return rec
            if origin_of(target) != host.origin and await address_problem(target, self.src.allow_private):
                rec["reason"], rec["detail"] = "robots_redirects", f"redirect to refused address {target}"
                return rec
            url = target
        if hop.reason and hop.status is None:
            rec["reason"], rec["detail"] = hop.reason, hop.detail
        elif hop.body is not None:
            rec["body"] = hop.body.decode("utf-8", errors="replace")
        return rec

    def _apply_robots(self, host: HostState, rec: dict[str, Any]) -> None:
        status = rec["status"]
        if rec["reason"] and status is None:
            # RFC 9309: an unreachable robots.txt means the whole site is disallowed.
            host.problem = (
                "robots_unavailable",
                f"{host.origin}/robots.txt: {rec['reason']} {rec['detail'] or ''}".strip(),
            )
            return
        if status is not None and status >= 500:
            host.problem = ("robots_unavailable", f"{host.origin}/robots.txt answered HTTP {status}")
            return
        if status is None or not 200 <= status < 300 or rec["body"] is None:
            return  # 4xx (or an unresolved redirect): no rules, everything allowed
        try:
            robots = Protego.parse(rec["body"])
        except Exception:  # a robots.txt the parser cannot read gives no rules
            return
        host.robots = robots
        ua = self.src.user_agent
        delays = [self.src.per_host_delay, robots.crawl_delay(ua) or 0.0]
        rate = robots.request_rate(ua)
        if rate is not None and rate.requests:
            delays.append(rate.seconds / rate.requests)
        host.delay = max(delays)
        if host.delay > self.src.max_crawl_delay:
            host.problem = (
                "crawl_delay_too_long",
                f"robots.txt asks for {host.delay:g} s between requests (max_crawl_delay {self.src.max_crawl_delay:g})",
            )

    # -------------------------------------------------------------------------------------- requests

    async def _request(self, url: str, robots: bool = False) -> Hop:
        """GET with the host's politeness limits, retrying timeouts, 429 and 5xx with backoff."""
        hop = Hop(url)
        attempts = 0
        for attempt in range(self.src.page_retries + 1):
            if attempt:
                wait = hop.retry_after if hop.retry_after is not None else self.src.retry_backoff * 2 ** (attempt - 1)
                await asyncio.sleep(min(wait, MAX_RETRY_WAIT))
            hop = await self._request_once(url, robots)
            attempts += 1
            if not hop.retryable:
                break
        hop.attempts = attempts
        return hop

    async def _request_once(self, url: str, robots: bool) -> Hop:
        host = self._host(origin_of(url))
        loop = asyncio.get_running_loop()
        async with host.slots:
            # The host's start lock is held until the request is on the wire: the delay then spaces
            # what the server receives, not merely when coroutines were scheduled (a busy event loop
            # could otherwise send two requests together). It is held while waiting for a global
            # slot too, or two requests of one host could wait there and then leave together.
            await host.start_lock.acquire()
            sent = False

            def on_the_wire() -> None:
                nonlocal sent
                if not sent:
                    sent = True
                    host.last_start = loop.time()
                    host.start_lock.release()

            try:
                wait = host.last_start + host.delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.global_slots.acquire()
            except BaseException:
                on_the_wire()
                raise
            try:
                return await self._get(url, robots, on_the_wire)
            finally:
                on_the_wire()
                self.global_slots.release()

    async def _get(self, url: str, robots: bool, on_the_wire: Any) -> Hop:
        src = self.src

        async def trace(event: str, info: dict[str, Any]) -> None:
            # httpcore reports each step; once the request head is written (or anything failed),
            # the host's next request may be scheduled.
            if event.endswith(("send_request_headers.complete", ".failed")):
                on_the_wire()

        hop = Hop(url)
        limit = ROBOTS_MAX_BYTES if robots else src.max_body_bytes
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(src.page_timeout):
                async with self._client(self._host(origin_of(url))).stream(
                    "GET", url, extensions={"trace": trace}
                ) as resp:
                    hop.status = resp.status_code
                    hop.retry_after = _retry_after(resp.headers.get("retry-after"))
                    raw_type = resp.headers.get("content-type")
                    hop.media_type, hop.charset = parse_content_type(raw_type)
                    if hop.status in REDIRECT_CODES and resp.headers.get("location"):
                        hop.location = resp.headers["location"]
                        return hop
                    if not 200 <= hop.status < 300:
                        hop.reason, hop.detail = f"http_{hop.status}", resp.reason_phrase or None
                        return hop
                    if not robots and hop.media_type and hop.media_type not in src.content_types:
                        hop.reason, hop.detail = "content_type", raw_type
                        return hop
                    length = resp.headers.get("content-length", "")
                    if length.isdigit() and int(length) > limit and not robots:
                        hop.reason, hop.detail = "too_large", f"Content-Length {length} > {limit} bytes"
                        return hop
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():  # decoded bytes: a gzip bomb counts in full
                        body += chunk
                        hop.bytes = len(body)
                        if len(body) > limit:
                            if robots:  # RFC 9309: rules past the limit may be ignored
                                del body[limit:]
                                break
                            hop.reason, hop.detail = "too_large", f"body over {limit} bytes"
                            return hop
                    hop.body = bytes(body)
                    if not robots and not hop.media_type:
                        if _looks_like_html(hop.body):
                            hop.media_type = "text/html"
                        else:
                            hop.reason, hop.detail, hop.body = "content_type", "no Content-Type and not HTML", None
        except TimeoutError:
            hop.reason, hop.detail = "timeout", f"no complete response within page_timeout {src.page_timeout:g} s"
        except httpx.TimeoutException as e:
            hop.reason, hop.detail = "timeout", type(e).__name__
        except httpx.DecodingError as e:
            hop.reason, hop.detail = "decoding_error", str(e)[:300]
        except httpx.HTTPError as e:
            hop.reason, hop.detail = "connection_error", f"{type(e).__name__}: {e}"[:300]
        except (httpx.InvalidURL, ValueError, UnicodeError) as e:
            hop.reason, hop.detail = "bad_url", str(e)[:300]
        finally:
            hop.latency_ms = round((time.perf_counter() - t0) * 1000, 2)
        return hop

    # ---------------------------------------------------------------------------------------- visits

    async def _redirect_refusal(self, target: str | None, location: str, chain: list[str]) -> tuple[str, str] | None:
        if target is None:
            return "bad_url", f"redirect to unparsable {location!r}"
        if scheme_of(target) not in CRAWLABLE_SCHEMES:
            return "unsupported_scheme", f"redirect to {target}"
        if target in chain:
            return "redirect_loop", " -> ".join([*chain, target])
        if why := self.scope.why_not(target):
            return "out_of_scope", f"redirect to {target}: {why}"
        if target in self.in_levels:
            return "duplicate_url", f"redirects to {target}, which is crawled directly"
        await self._prepare_host(origin_of(target))
        refusal = self._host_refusal(target)
        return (refusal[0], f"redirect to {target}: {refusal[1]}") if refusal else None

    async def _visit(self, url: str, depth: int) -> dict[str, Any]:
        src = self.src
        rec: dict[str, Any] = {"t": "page", "url": url, "depth": depth, "hops": [], "fetched_at": _now()}
        chain = [url]
        current = url
        for n in itertools.count():
            hop = await self._request(current)
            rec["hops"].append(hop.summary())
            if hop.location is None:
                break
            if n == src.max_redirects:
                return {**rec, "reason": "too_many_redirects", "detail": f"more than {src.max_redirects} redirects"}
            target = normalize_url(hop.location, base=current, sort_query=src.sort_query)
            refusal = await self._redirect_refusal(target, hop.location, chain)
            if refusal:
                return {**rec, "reason": refusal[0], "detail": refusal[1]}
            chain.append(target)
            current = target
        rec.update(final_url=current, status=hop.status, content_type=hop.media_type or None)
        if hop.reason:
            return {**rec, "reason": hop.reason, "detail": hop.detail}
        page = await self.extractor.analyse(
            body=hop.body,
            url=current,
            media_type=hop.media_type,
            header_charset=hop.charset,
            respect_nofollow=src.respect_nofollow,
            sort_query=src.sort_query,
            fallback=src.extraction_fallback,
        )
        rec.update(encoding=page["encoding"], title=page["title"], links=page["links"])
        if page["error"]:
            return {**rec, "reason": "extraction_error", "detail": page["error"]}
        if page["noindex"]:
            return {**rec, "reason": "noindex", "detail": "<meta name=robots> says noindex"}
        if not page["text"]:
            return {**rec, "reason": "empty_extraction", "detail": f"no main text in {len(hop.body)} bytes"}
        return {**rec, "reason": None, "text": page["text"]}


# --------------------------------------------------------------------------------------------- output


def emit_journal(journal: Journal, label: str, out: ArtifactWriter, report: CrawlReport, batch_rows: int) -> None:
    """Write the crawl's documents and rejects, each sorted by URL, from the journal alone.

    One pass indexes the journal (no text kept); documents are then read back by offset in URL order.
    A final URL reached from several requested URLs (redirects) is kept once: preferably from the
    URL that is itself the final one, else from the smallest requested URL.
    """
    stats = out.stats
    pages: list[tuple[str, int, dict[str, Any]]] = []
    skipped: list[tuple[str, str, str, str | None, int]] = []
    for offset, rec in journal.load():
        t = rec.get("t")
        if t == "robots":
            for h in rec["hops"]:
                report.request(host_of(h["url"]), h["status"], h["bytes"], h["latency_ms"], h["attempts"])
                stats.bytes_in += h["bytes"]
        elif t == "level":
            skipped.extend((u, reason, detail, parent, rec["depth"]) for u, reason, detail, parent in rec["skipped"])
        elif t == "page":
            rec.pop("text", None)
            rec.pop("links", None)
            pages.append((rec["url"], offset, rec))
            for h in rec["hops"]:
                report.request(host_of(h["url"]), h["status"], h["bytes"], h["latency_ms"], h["attempts"])
                stats.bytes_in += h["bytes"]

    kept: dict[str, tuple[str, int, dict[str, Any]]] = {}
    for url, offset, rec in sorted(pages, key=lambda p: p[0]):
        if rec["reason"] is None:
            final = rec["final_url"]
            best = kept.get(final)  # pages come in URL order: the first is the smallest
            if best is None or (url == final and best[0] != final):
                kept[final] = (url, offset, rec)
    kept_offsets = {v[1] for v in kept.values()}

    docs = DocumentBatcher(DOCUMENT_SCHEMA, batch_rows)
    for final in sorted(kept):
        url, offset, rec = kept[final]
        text = journal.read_at(offset)["text"]
        meta = {
            "title": rec.get("title"),
            "url": final,
            "status": rec.get("status"),
            "fetched_at": rec["fetched_at"],
            "content_type": rec.get("content_type"),
            "encoding": rec.get("encoding"),
            "depth": rec["depth"],
        }
        if url != final:
            meta["requested_url"] = url
            meta["redirects"] = [h["url"] for h in rec["hops"]]
        stats.rows_in += 1
        report.row(host_of(url), None)
        out.write(
            docs.add(id=stable_id(label, final), text=text, source=label, url=final, lang=None, meta=meta_json(meta))
        )
    out.write(docs.flush())

    rows: list[tuple[str, str, str | None, dict[str, Any]]] = []
    for url, offset, rec in pages:
        if offset in kept_offsets:
            continue
        reason, detail = rec["reason"], rec.get("detail")
        if reason is None:
            kept_url = kept[rec["final_url"]][0]
            reason, detail = "duplicate_url", f"{rec['final_url']} is kept from {kept_url}"
        meta = {
            "depth": rec["depth"],
            "status": rec.get("status"),
            "fetched_at": rec["fetched_at"],
            "content_type": rec.get("content_type"),
            "title": rec.get("title"),
        }
        if rec.get("final_url") and rec["final_url"] != url:
            meta["final_url"] = rec["final_url"]
        rows.append((url, reason, detail, meta))
    for url, reason, detail, parent, depth in skipped:
        rows.append((url, reason, detail, {"depth": depth, "linked_from": parent}))

    for url, reason, detail, meta in sorted(rows, key=lambda r: r[0]):
        stats.rows_in += 1
        report.row(host_of(url) if scheme_of(url) in CRAWLABLE_SCHEMES else "", reason)
        out.reject(
            reason,
            detail,
            id=stable_id(label, url),
            source=label,
            url=url,
            meta=meta_json({k: v for k, v in meta.items() if v is not None}),
        )


def crawl_web(
    src: WebSource,
    label: str,
    journal_path: str,
    extractor: Extractor,
    out: ArtifactWriter,
    report: CrawlReport,
    batch_rows: int,
) -> None:
    journal = Journal(journal_path)
    try:
        crawler = WebCrawler(src, label, journal, extractor)
        crawler.resume()
        if crawler.resumed_pages:
            log.info("%s: resuming at depth %d with %d page(s) journaled", label, crawler.depth, crawler.resumed_pages)
        t0 = time.perf_counter()
        run_async(crawler.run())
        out.count("web_crawl_seconds", round(time.perf_counter() - t0, 3))
        log.info(
            "%s: crawl done, writing %d page(s) from the journal", label, crawler.resumed_pages + crawler.fetched_pages
        )
        out.count("web_pages_resumed", crawler.resumed_pages)
        out.count("web_pages_fetched", crawler.fetched_pages)
        emit_journal(journal, label, out, report, batch_rows)
    finally:
        journal.close()


def run_async(coro: Any) -> Any:
    """asyncio.run, also from a thread that already runs an event loop (a Prefect async context)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
