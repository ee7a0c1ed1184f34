"""Bytes of a fetched page -> text, title and links.

Shared by the web crawl and WARC ingest, and run in worker processes (extraction is CPU-bound and
would otherwise stall the crawl's event loop), so everything here is a plain function of plain
arguments returning plain dicts.
"""

from __future__ import annotations

import codecs
import logging
import re
import threading
from collections import deque
from typing import Any

from tasks.crawl.urls import NON_LINK_SCHEMES, normalize_url, scheme_of

log = logging.getLogger("kiln.crawl")

HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_BATCH = 16  # pages per message to a worker process
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_:.-]+)""", re.I)
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_SPACES = re.compile(r"\s+")


def parse_content_type(header: str | None) -> tuple[str, str | None]:
    """('text/html', 'iso-8859-1') from 'text/html; charset="ISO-8859-1"'."""
    if not header:
        return "", None
    media, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip("\"'").lower() or None
    return media.strip().lower(), charset


def _known_codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def detect_encoding(body: bytes, header_charset: str | None, html: bool) -> str:
    """Byte-order mark, then the HTTP header, then <meta charset>, then strict UTF-8, then detection."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name
    declared = _known_codec(header_charset)
    if declared is None and html:
        m = _META_CHARSET.search(body[:4096])
        declared = _known_codec(m.group(1).decode("ascii", "ignore")) if m else None
    if declared:
        # A page declared ASCII / Latin-1 is in practice cp1252 (the WHATWG rule browsers follow).
        return "cp1252" if declared in ("ascii", "latin-1", "iso8859-1") else declared
    try:
        body.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(body[:65536]).best()
    return _known_codec(best.encoding) if best is not None and _known_codec(best.encoding) else "cp1252"


def decode(body: bytes, encoding: str) -> str:
    text = body.decode(encoding, errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


def _clean_title(title: str | None) -> str | None:
    if not title:
        return None
    title = _SPACES.sub(" ", title).strip()
    return title or None


def _failed(error: str | None) -> dict[str, Any]:
    """An analysis with nothing found; `error` says why, if something went wrong."""
    return {
        "text": "",
        "title": None,
        "links": [],
        "encoding": None,
        "noindex": False,
        "nofollow": False,
        "error": error,
    }


def analyse_page(
    body: bytes,
    url: str,
    media_type: str,
    header_charset: str | None = None,
    follow_links: bool = True,
    respect_nofollow: bool = True,
    sort_query: bool = False,
    fallback: bool = False,
) -> dict[str, Any]:
    """Decode and extract one page. Never raises on bad input: a failure is an `error` field."""
    html = media_type in HTML_TYPES
    result = _failed(None)
    try:
        encoding = detect_encoding(body, header_charset, html)
        result["encoding"] = encoding
        text = decode(body, encoding)
        if not html:
            result["text"] = text.strip()
            return result
        _analyse_html(text, url, result, follow_links, respect_nofollow, sort_query, fallback)
    except Exception as e:  # lxml and trafilatura raise a variety of errors on hostile markup
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    return result


def _analyse_html(
    text: str,
    url: str,
    result: dict[str, Any],
    follow_links: bool,
    respect_nofollow: bool,
    sort_query: bool,
    fallback: bool,
) -> None:
    import lxml.html
    import trafilatura
    from lxml.etree import ParserError

    text = _XML_DECL.sub("", text, count=1)  # lxml refuses str input that declares an encoding
    if not text.strip():
        return
    try:
        tree = lxml.html.document_fromstring(text)
    except ParserError:  # "Document is empty": comments or whitespace only
        return
    result["title"] = _clean_title(tree.findtext(".//title"))
    for meta in tree.iter("meta"):
        if (meta.get("name") or "").strip().lower() == "robots":
            directives = {d.strip() for d in (meta.get("content") or "").lower().split(",")}
            result["noindex"] |= bool(directives & {"noindex", "none"})
            result["nofollow"] |= bool(directives & {"nofollow", "none"})
    if follow_links and not (respect_nofollow and result["nofollow"]):
        base = url
        base_el = tree.find(".//base[@href]")
        if base_el is not None:
            base = normalize_url(base_el.get("href"), base=url) or url
        links: dict[str, None] = {}
        for el in tree.iter("a", "area"):
            href = el.get("href")
            if not href or href.startswith("#"):
                continue
            if respect_nofollow and "nofollow" in (el.get("rel") or "").lower().split():
                continue
            if scheme_of(href.strip()) in NON_LINK_SCHEMES:
                continue
            link = normalize_url(href, base=base, sort_query=sort_query)
            if link and scheme_of(link) not in NON_LINK_SCHEMES:
                links[link] = None
        result["links"] = list(links)
    if not result["title"]:
        result["title"] = _clean_title(tree.findtext(".//h1"))
    # trafilatura prunes the tree it is given; links and title were read above, before that.
    extracted = trafilatura.extract(
        tree,
        url=url,
        fast=not fallback,
        include_comments=False,
        include_tables=True,
        deduplicate=False,
    )
    result["text"] = (extracted or "").strip()


def _analyse_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return analyse_page(**kwargs)


def _analyse_batch(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [analyse_page(**kwargs) for kwargs in calls]


class Extractor:
    """Runs `analyse_page` in worker processes, or in a thread when workers == 0.

    Workers come from a forkserver, not a fork of this process: the stage may run inside Prefect,
    whose threads could hold locks at fork time. A pool that breaks before any page came back could
    not start its workers (an unguarded `__main__` script re-run by them, no /dev/shm): extraction
    falls back to a thread, slower but correct. A pool that breaks later lost a worker to one page
    (a parser crash on hostile markup): the pool is rebuilt and that page fails alone.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None
        self._thread_pool = None
        self._pool_worked = False
        self._lock = threading.Lock()
        self._waiting: deque[tuple[dict[str, Any], Any]] = deque()
        self._dispatcher = None
        self._slots = None
        self._slots_loop = None
        self._running: set[Any] = set()

    def _executor(self):
        with self._lock:  # warm() may be creating the pool from its thread right now
            return self._make_executor()

    def _make_executor(self):
        import concurrent.futures
        import multiprocessing

        if self.workers and multiprocessing.current_process().daemon:
            # A daemonic process (a Dask worker, a multiprocessing pool worker) may not have children.
            log.warning("extracting in a thread: this process is daemonic and cannot start worker processes")
            self.workers = 0
        if self.workers == 0:
            if self._thread_pool is None:
                self._thread_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kiln-extract")
            return self._thread_pool
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["tasks.crawl.extract", "lxml.html", "trafilatura"])
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self._pool

    def _broken(self, error: BaseException) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if not self._pool_worked and self.workers:
            log.warning("extraction worker processes failed (%s); extracting in a thread instead", error)
            self.workers = 0

    def warm(self) -> None:
        """Start the worker processes in the background (a forkserver importing lxml and trafilatura
        takes seconds), so that this overlaps with the first network round trips."""

        def start() -> None:
            try:
                for _ in range(self.workers):
                    self._executor().submit(_analyse_batch, [])
            except Exception as e:  # reported again, and handled, when the first page needs a worker
                log.debug("extraction workers did not start in the background: %s", e)

        if self.workers:
            threading.Thread(target=start, name="kiln-extract-warm", daemon=True).start()

    async def analyse(self, **kwargs: Any) -> dict[str, Any]:
        """Analyse one page. Pages waiting while the workers are busy travel to them in batches, so
        the per-call cost of inter-process messages is paid once per batch rather than per page."""
        import asyncio

        loop = asyncio.get_running_loop()
        result = loop.create_future()
        self._waiting.append((kwargs, result))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.ensure_future(self._dispatch())
        return await result

    async def _dispatch(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            # two batches per worker in flight: one being analysed, one queued behind it
            self._slots, self._slots_loop = asyncio.Semaphore(2 * max(self.workers, 1)), loop
        while self._waiting:
            await self._slots.acquire()
            batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), MAX_BATCH))]
            task = asyncio.ensure_future(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: Any) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _run_batch(self, batch: list[tuple[dict[str, Any], Any]]) -> None:
        import asyncio
        from concurrent.futures.process import BrokenProcessPool

        loop = asyncio.get_running_loop()
        calls = [call for call, _ in batch]
        try:
            try:
                results = await loop.run_in_executor(self._executor(), _analyse_batch, calls)
                self._pool_worked = self._pool_worked or self.workers > 0
            except BrokenProcessPool as e:
                self._broken(e)
                results = []
                for call in calls:  # one at a time, so that a poisonous page fails alone
                    try:
                        results += await loop.run_in_executor(self._executor(), _analyse_batch, [call])
                    except BrokenProcessPool as e2:
                        self._broken(e2)
                        results.append(_failed(f"extraction worker died: {e2}"))
        except BaseException as e:  # hand any other failure to the pages' own awaiters
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            raise
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    def map(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Results in the order of `calls` (WARC records keep their file order)."""
        from concurrent.futures.process import BrokenProcessPool

        chunk = max(1, len(calls) // (4 * max(self.workers, 1)))
        try:
            results = list(self._executor().map(_analyse_kwargs, calls, chunksize=chunk))
            self._pool_worked = self._pool_worked or self.workers > 0
            return results
        except BrokenProcessPool as e:
            self._broken(e)
        results = []
        for call in calls:  # one at a time, so that a poisonous page fails alone
            try:
                results.append(self._executor().submit(_analyse_kwargs, call).result())
            except BrokenProcessPool as e:
                self._broken(e)
                results.append(_failed(f"extraction worker died: {e}"))
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=True)
            self._thread_pool = None

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
