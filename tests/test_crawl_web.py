"""The web crawler against real HTTP servers on 127.0.0.x that serve pages the tests write.

Politeness is checked on the server side: what each server received, when, with how many requests
in flight, and with which User-Agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from tasks.artifacts import ArtifactStore
from tasks.crawl import CodeSource, CrawlConfig, CrawlStage, WebSource
from tasks.crawl.urls import Scope, normalize_url
from tasks.stage import run_in_store

UA = "KilnTestBot/1.0 (+https://example.invalid/bot)"
WORDS = (
    "The crawler reads this paragraph as the main text of a page. It has enough ordinary words, "
    "sentences and punctuation to look like an article to a main-text extractor, which throws away "
    "navigation, footers and other boilerplate around it. "
)


def article(title: str, body: str = "", links: list[str] = (), extra_head: str = "") -> bytes:
    anchors = "".join(f'<li><a href="{href}">link {i}</a></li>' for i, href in enumerate(links))
    return (
        f"<!DOCTYPE html><html><head><title>{title}</title>{extra_head}</head><body>"
        f"<nav><ul>{anchors}</ul></nav><main><article><h1>{title}</h1>"
        f"<p>{body} {WORDS * 3}</p><p>{WORDS * 2}</p></article></main>"
        f"<footer>Footer text</footer></body></html>"
    ).encode()


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    fail_first: int = 0  # answer 503 this many times first


@dataclass
class Hit:
    path: str
    start: float
    user_agent: str | None
    end: float | None = None


class LoopbackSite:
    """A real HTTP server on one loopback address, recording every request it receives."""

    def __init__(self, ip: str, routes: dict[str, Route] | None = None):
        self.routes = routes or {}
        self.hits: list[Hit] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hit = Hit(self.path, time.monotonic(), self.headers.get("User-Agent"))
                with site.lock:
                    site.hits.append(hit)
                    site.in_flight += 1
                    site.max_in_flight = max(site.max_in_flight, site.in_flight)
                try:
                    site.serve(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with site.lock:
                        site.in_flight -= 1
                        hit.end = time.monotonic()

        self.server = ThreadingHTTPServer((ip, 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self.origin = f"http://{ip}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        route = self.routes.get(h.path)
        if route is None:
            h.send_response(404)
            h.send_header("Content-Type", "text/html")
            h.end_headers()
            h.wfile.write(b"<html><body>not found</body></html>")
            return
        if route.fail_first > 0:
            route.fail_first -= 1
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if route.delay:
            time.sleep(route.delay)
        h.send_response(route.status)
        if route.content_type:
            h.send_header("Content-Type", route.content_type)
        for k, v in route.headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(route.body)))
        h.end_headers()
        h.wfile.write(route.body)

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sites():
    made: list[LoopbackSite] = []

    def make(ip: str, routes: dict[str, Route] | None = None) -> LoopbackSite:
        s = LoopbackSite(ip, routes)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def web(**kw) -> WebSource:
    base = dict(
        user_agent=UA,
        allow_private=True,
        per_host_delay=0.0,
        page_retries=0,
        connect_timeout=2.0,
        read_timeout=1.0,
        page_timeout=5.0,
        max_redirects=3,
        max_body_bytes=64 * 1024,
    )
    return WebSource(**{**base, **kw})


def crawl(tmp_path, *sources, workers=0, store="store"):
    cfg = CrawlConfig(sources=list(sources), extract_workers=workers)
    return run_in_store(CrawlStage(), cfg, [], ArtifactStore(str(tmp_path / store)))


def by_url(rows):
    return {r["url"]: r for r in rows}


# ------------------------------------------------------------------------------------------ the site


def test_crawl_of_a_site_with_every_kind_of_page(tmp_path, sites):
    b = sites("127.0.0.2")
    c = sites("127.0.0.3")
    d = sites("127.0.0.4")
    a = sites("127.0.0.1")
    links = [
        "/a.html",
        "/a.html#section",
        "/./a.html",
        "/b.html",
        "/private/x.html",
        "/redirect1",
        "/redirect-new",
        "/loop1",
        "/chain1",
        "/redirect-out",
        "/redirect-file",
        "/missing",
        "/error",
        "/slow",
        "/timeout",
        "/doc.pdf",
        "/huge",
        "/latin1",
        "/notes.txt",
        "/noindex",
        "/empty",
        "/untyped",
        "http://example.com/elsewhere",
        "file:///etc/passwd",
        "mailto:someone@example.com",
        "javascript:void(0)",
        f"{b.origin}/",
        f"{c.origin}/c.html",
        f"{d.origin}/d.html",
    ]
    a.routes.update(
        {
            "/robots.txt": Route(
                b"User-agent: KilnTestBot\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n",
                content_type="text/plain",
            ),
            "/": Route(article("Home", links=links)),
            "/a.html": Route(article("Page A", "Alpha page.")),
            "/b.html": Route(article("Page B", "Beta page.", links=['/nofollowed.html" rel="nofollow'])),
            "/private/x.html": Route(article("Private")),
            "/redirect1": Route(status=301, headers={"Location": "/redirect2"}),
            "/redirect2": Route(status=302, headers={"Location": "/b.html"}),
            "/redirect-new": Route(status=308, headers={"Location": f"{a.origin}/target.html"}),
            "/target.html": Route(article("Target", "Reached by a redirect only.")),
            "/loop1": Route(status=302, headers={"Location": "/loop2"}),
            "/loop2": Route(status=302, headers={"Location": "/loop1"}),
            **{f"/chain{i}": Route(status=302, headers={"Location": f"/chain{i + 1}"}) for i in range(1, 8)},
            "/redirect-out": Route(status=302, headers={"Location": "http://example.com/"}),
            "/redirect-file": Route(status=302, headers={"Location": "file:///etc/passwd"}),
            "/error": Route(b"<html>oops</html>", status=500),
            "/slow": Route(article("Slow", "This one took a while."), delay=0.4),
            "/timeout": Route(article("Never"), delay=3.0),
            "/doc.pdf": Route(b"%PDF-1.4 binary stuff", content_type="application/pdf"),
            "/huge": Route(article("Huge", "x" * 200_000)),
            "/latin1": Route(
                (
                    "<html><head><title>Caf\xe9</title></head><body><article><p>Le caf\xe9 est servi \xe0 la "
                    "terrasse, pr\xe8s de la for\xeat. " + WORDS * 3 + "</p></article></body></html>"
                ).encode("latin-1"),
                content_type="text/html",
            ),
            "/notes.txt": Route(("Plain text notes. " + WORDS).encode(), content_type="text/plain"),
            "/noindex": Route(
                article("Hidden", extra_head='<meta name="robots" content="noindex">', links=["/from-noindex.html"])
            ),
            "/from-noindex.html": Route(article("From noindex", "Linked from a noindex page, still followed.")),
            "/nofollowed.html": Route(article("Should not be fetched")),
            "/empty": Route(b"<html><head><title>Empty</title></head><body></body></html>"),
            "/untyped": Route(article("Untyped", "Served without a Content-Type."), content_type=None),
        }
    )
    b.routes.update(
        {
            "/robots.txt": Route(b"User-agent: *\nCrawl-delay: 0.3\n", content_type="text/plain"),
            "/": Route(article("B home", links=["/p1.html", "/p2.html", "/p3.html"])),
            **{f"/p{i}.html": Route(article(f"B page {i}")) for i in range(1, 4)},
        }
    )
    c.routes.update(
        {"/robots.txt": Route(b"down", status=500, content_type="text/plain"), "/c.html": Route(article("C"))}
    )
    d.routes.update({"/d.html": Route(article("D"))})

    src = web(seeds=[a.origin + "/"], allowed_domains=["127.0.0.1", "127.0.0.2", "127.0.0.3"], max_depth=2)
    art = crawl(tmp_path, src)
    st = art.stats
    docs = by_url(art.read_table().to_pylist())
    rejects = by_url(art.read_table(table="rejects").to_pylist())
    A, B = a.origin, b.origin

    assert st.rows_in == st.rows_out + st.rows_rejected == len(docs) + len(rejects)
    assert set(docs) == {
        f"{A}/",
        f"{A}/a.html",
        f"{A}/b.html",
        f"{A}/target.html",
        f"{A}/slow",
        f"{A}/latin1",
        f"{A}/notes.txt",
        f"{A}/from-noindex.html",
        f"{A}/untyped",
        f"{B}/",
        f"{B}/p1.html",
        f"{B}/p2.html",
        f"{B}/p3.html",
    }
    reasons = {url: r["reason"] for url, r in rejects.items()}
    assert reasons == {
        f"{A}/private/x.html": "robots_denied",
        f"{A}/redirect1": "duplicate_url",  # ends at /b.html, which is crawled directly
        f"{A}/loop1": "redirect_loop",
        f"{A}/chain1": "too_many_redirects",
        f"{A}/redirect-out": "out_of_scope",
        f"{A}/redirect-file": "unsupported_scheme",
        f"{A}/missing": "http_404",
        f"{A}/error": "http_500",
        f"{A}/timeout": "timeout",
        f"{A}/doc.pdf": "content_type",
        f"{A}/huge": "too_large",
        f"{A}/noindex": "noindex",
        f"{A}/empty": "empty_extraction",
        "http://example.com/elsewhere": "out_of_scope",
        "file:///etc/passwd": "unsupported_scheme",
        f"{c.origin}/c.html": "robots_unavailable",
        f"{d.origin}/d.html": "out_of_scope",
    }
    assert rejects[f"{A}/doc.pdf"]["detail"] == "application/pdf"
    assert "/loop2 -> " in rejects[f"{A}/loop1"]["detail"]

    # content and meta
    latin = docs[f"{A}/latin1"]
    assert "Le café est servi à la terrasse, près de la forêt." in latin["text"]
    meta = json.loads(latin["meta"])
    assert meta["title"] == "Café" and meta["encoding"] == "cp1252" and meta["status"] == 200
    home = json.loads(docs[f"{A}/"]["meta"])
    assert home["url"] == f"{A}/" and home["content_type"] == "text/html" and home["fetched_at"].endswith("+00:00")
    target = json.loads(docs[f"{A}/target.html"]["meta"])
    assert target["requested_url"] == f"{A}/redirect-new" and target["redirects"] == [
        f"{A}/redirect-new",
        f"{A}/target.html",
    ]
    assert "Alpha page." in docs[f"{A}/a.html"]["text"] and "Footer text" not in docs[f"{A}/a.html"]["text"]
    assert docs[f"{A}/notes.txt"]["text"].startswith("Plain text notes.")
    assert all(d["source"] == f"web:127.0.0.1:{a.port}" for d in docs.values())
    assert len({d["id"] for d in docs.values()}) == len(docs)

    # what the servers saw
    a_paths = a.paths()
    assert a_paths.count("/a.html") == 1  # fragment and dot segments normalised away
    assert a_paths.count("/b.html") == 1 and a_paths.count("/robots.txt") == 1
    assert "/private/x.html" not in a_paths and "/nofollowed.html" not in a_paths
    assert a_paths.count("/chain1") == 1 and "/chain5" not in a_paths  # 3 redirects followed, then given up
    assert {h.user_agent for h in a.hits + b.hits} == {UA}
    assert c.paths() == ["/robots.txt"]  # robots.txt answered 500: the whole host is off limits
    assert d.hits == []  # out of scope: never contacted
    b_starts = sorted(h.start for h in b.hits)
    assert len(b_starts) == 5  # robots.txt + 4 pages
    gaps = [y - x for x, y in zip(b_starts, b_starts[1:])]
    assert min(gaps) >= 0.3 - 0.02, gaps  # robots.txt Crawl-delay, measured on the server

    # the crawl report
    report = {r["host"]: r for r in art.read_table(table="report").to_pylist()}
    ra = report[f"127.0.0.1:{a.port}"]
    assert ra["robots_denied"] == 1 and ra["documents"] == 9
    assert json.loads(ra["rejected_by_reason"])["http_404"] == 1
    assert json.loads(ra["status_counts"])["200"] >= 9 and ra["bytes"] > 0 and ra["mean_latency_ms"] > 0
    assert report[f"127.0.0.2:{b.port}"]["documents"] == 4
    assert st.rejected["robots_denied"] == 1 and st.extra["web_requests"] == len(a.hits) + len(b.hits) + len(c.hits)


def test_private_addresses_refused_unless_allowed(tmp_path, sites):
    a = sites("127.0.0.1", {"/": Route(article("Home"))})
    art = crawl(tmp_path, web(seeds=[a.origin + "/"], allow_private=False))
    rej = art.read_table(table="rejects").to_pylist()
    assert [r["reason"] for r in rej] == ["private_address"] and "127.0.0.1" in rej[0]["detail"]
    assert art.num_rows == 0 and a.hits == []


def test_bad_config_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match=r"(?s)sources\.0\.web\.seeds.*file:// and others are refused"):
        CrawlConfig(sources=[{"kind": "web", "seeds": ["file:///etc/passwd"]}])
    with pytest.raises(ValidationError, match=r"(?s)sources\.0\.web\.max_pagez"):
        CrawlConfig(sources=[{"kind": "web", "seeds": ["http://x/"], "max_pagez": 3}])
    with pytest.raises(ValidationError, match=r"(?s)sources\.0\.web\.include.*not a valid regular expression"):
        CrawlConfig(sources=[{"kind": "web", "seeds": ["http://x/"], "include": ["("]}])
    with pytest.raises(ValidationError, match=r"(?s)sources\.0.*kind"):
        CrawlConfig(sources=[{"kind": "ftp", "seeds": ["http://x/"]}])
    with pytest.raises(ValidationError, match=r"(?s)sources\.0\.web\.per_host_concurrency"):
        CrawlConfig(sources=[{"kind": "web", "seeds": ["http://x/"], "per_host_concurrency": 0}])


def test_concurrency_and_delay_limits_hold_on_the_server(tmp_path, sites):
    pages = [f"/p{i}.html" for i in range(12)]
    slow = {"/": Route(article("Home", links=pages)), **{p: Route(article(p), delay=0.15) for p in pages}}
    a = sites("127.0.0.1", dict(slow))
    b = sites("127.0.0.2", dict(slow))
    t0 = time.monotonic()
    art = crawl(
        tmp_path,
        web(seeds=[a.origin + "/", b.origin + "/"], per_host_concurrency=3, concurrency=4, respect_robots=False),
    )
    assert art.num_rows == 26
    assert a.max_in_flight <= 3 and b.max_in_flight <= 3
    assert a.max_in_flight + b.max_in_flight >= 4  # both hosts really were crawled in parallel
    both = sorted([(h.start, 1) for h in a.hits + b.hits] + [(h.end, -1) for h in a.hits + b.hits])
    level, peak = 0, 0
    for _, step in both:
        level += step
        peak = max(peak, level)
    assert peak <= 4  # the global limit, over both servers
    assert time.monotonic() - t0 < 10

    c = sites("127.0.0.3", {"/": Route(article("Home", links=pages[:5])), **{p: Route(article(p)) for p in pages[:5]}})
    crawl(
        tmp_path,
        web(seeds=[c.origin + "/"], per_host_concurrency=4, per_host_delay=0.1, respect_robots=False),
        store="store2",
    )
    starts = sorted(h.start for h in c.hits)
    assert len(starts) == 6 and min(y - x for x, y in zip(starts, starts[1:])) >= 0.1 - 0.02


def test_depth_and_page_budget_cut_deterministically(tmp_path, sites):
    routes = {"/": Route(article("Home", links=[f"/d1-{i}" for i in range(6)]))}
    for i in range(6):
        routes[f"/d1-{i}"] = Route(article(f"d1 {i}", links=[f"/d2-{i}"]))
        routes[f"/d2-{i}"] = Route(article(f"d2 {i}", links=[f"/d3-{i}"]))
    a = sites("127.0.0.1", routes)
    art = crawl(tmp_path, web(seeds=[a.origin + "/"], max_depth=1, respect_robots=False))
    assert sorted(r["url"].rsplit("/", 1)[1] for r in art.read_table().to_pylist()) == [
        "",
        *[f"d1-{i}" for i in range(6)],
    ]
    rej = art.read_table(table="rejects").to_pylist()
    assert {r["reason"] for r in rej} == {"max_depth"} and len(rej) == 6
    assert not any(p.startswith("/d2") for p in a.paths())

    a.hits.clear()
    art = crawl(tmp_path, web(seeds=[a.origin + "/"], max_depth=5, max_pages=9, respect_robots=False), store="s2")
    kept = sorted(r["url"].rsplit("/", 1)[1] for r in art.read_table().to_pylist())
    # level 0: 1 page, level 1: 6 pages, level 2: the first 2 of 6 in URL order
    assert kept == ["", *[f"d1-{i}" for i in range(6)], "d2-0", "d2-1"]
    reasons = {r["url"].rsplit("/", 1)[1]: r["reason"] for r in art.read_table(table="rejects").to_pylist()}
    assert reasons == {f"d2-{i}": "max_pages" for i in range(2, 6)} | {"d3-0": "max_pages", "d3-1": "max_pages"}
    assert len(a.hits) == 9


def test_retries_after_503_and_extraction_in_worker_processes(tmp_path, sites):
    a = sites(
        "127.0.0.1",
        {
            "/": Route(article("Home", links=["/flaky", "/x.html"])),
            "/flaky": Route(article("Flaky", "Worked on the second try."), fail_first=1),
            "/x.html": Route(article("X")),
        },
    )
    art = crawl(
        tmp_path, web(seeds=[a.origin + "/"], page_retries=1, retry_backoff=0.05, respect_robots=False), workers=2
    )
    docs = by_url(art.read_table().to_pylist())
    assert "Worked on the second try." in docs[f"{a.origin}/flaky"]["text"]
    assert a.paths().count("/flaky") == 2
    report = art.read_table(table="report").to_pylist()[0]
    assert report["requests"] == 4 and json.loads(report["status_counts"]) == {"200": 3}
    in_thread = crawl(tmp_path, web(seeds=[a.origin + "/"], respect_robots=False), store="s2")
    assert [d["text"] for d in in_thread.read_table().to_pylist()] == [d["text"] for d in docs.values()]


def test_snapshot_is_the_cache_key_and_politeness_is_not(tmp_path):
    stage = CrawlStage()
    base = CrawlConfig(sources=[web(seeds=["http://127.0.0.1:9/"])])
    fp = stage.fingerprint(base, [])
    tuned = CrawlConfig(
        sources=[web(seeds=["http://127.0.0.1:9/"], concurrency=3, per_host_delay=2.0)], extract_workers=1
    )
    assert stage.fingerprint(tuned, []) == fp
    assert stage.fingerprint(CrawlConfig(sources=[web(seeds=["http://127.0.0.1:9/"], snapshot="2026-12")]), []) != fp
    assert stage.fingerprint(CrawlConfig(sources=[web(seeds=["http://127.0.0.1:9/"], max_pages=5)]), []) != fp


def test_an_unchanged_source_is_copied_when_another_source_changed(tmp_path, sites):
    """Units have their own identity: editing the code tree makes a new crawl artifact, but the web
    source in it is copied from the previous one, not fetched again; a new snapshot fetches it."""
    site = sites(
        "127.0.0.1",
        {
            "/": Route(article("Home", "welcome", links=["/a"])),
            "/a": Route(article("A", "page a")),
            "/robots.txt": Route(b"", status=404),
        },
    )
    code = tmp_path / "code"
    code.mkdir()
    (code / "m.py").write_text("def f():\n    return 1\n")
    code_src = CodeSource(path=str(code), use_gitignore=False)
    first = crawl(tmp_path, web(seeds=[site.origin + "/"]), code_src)
    hits = len(site.hits)
    assert hits >= 2 and {r["url"] for r in first.read_table().to_pylist() if r["url"]} == {
        site.origin + "/",
        site.origin + "/a",
    }

    (code / "m.py").write_text("def f():\n    return 22\n")
    second = crawl(tmp_path, web(seeds=[site.origin + "/"]), code_src)
    assert second.fingerprint != first.fingerprint
    assert len(site.hits) == hits  # nothing fetched again
    assert [r.get("reused_from") for r in second.manifest["unit_results"]] == [first.fingerprint, None]
    old, new = first.read_table().to_pylist(), second.read_table().to_pylist()
    assert [r for r in new if r["url"]] == [r for r in old if r["url"]]  # the web documents, byte for byte
    assert [r["text"] for r in new if not r["url"]] == ["def f():\n    return 22\n"]
    assert second.stats.rows_out == first.stats.rows_out

    third = crawl(tmp_path, web(seeds=[site.origin + "/"], snapshot="next"), code_src)
    assert len(site.hits) > hits  # a new snapshot of the web source is a new crawl of it
    assert [r.get("reused_from") for r in third.manifest["unit_results"]] == [None, second.fingerprint]

    hits = len(site.hits)
    cfg = CrawlConfig(sources=[web(seeds=[site.origin + "/"]), code_src], extract_workers=0)
    again = run_in_store(CrawlStage(), cfg, [], ArtifactStore(str(tmp_path / "store")), refresh=True)
    assert again.fingerprint == second.fingerprint and len(site.hits) > hits  # a refresh fetches, copies nothing
    assert [r.get("reused_from") for r in again.manifest["unit_results"]] == [None, None]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("HTTP://Example.COM:80/a/./b/../c?x=1#frag", "http://example.com/a/c?x=1"),
        ("https://h:443/a b/%7euser/%2f", "https://h/a%20b/~user/%2F"),
        ("http://user:secret@h/", "http://h/"),
        ("http://bücher.de", "http://xn--bcher-kva.de/"),
        ("http://h/a/..", "http://h/"),
        ("http://h:99999/", None),
    ],
)
def test_url_normalisation(raw, expected):
    assert normalize_url(raw) == expected


def test_scope_domains_ports_and_patterns():
    s = Scope.for_seeds(["http://docs.example.org/"], ["example.org", "127.0.0.1:8000"], [r"/docs/"], [r"\.zip$"])
    assert s.why_not("http://docs.example.org/docs/a") is None
    assert s.why_not("http://sub.example.org/docs/a") is None
    assert s.why_not("http://badexample.org/docs/a") is not None
    assert s.why_not("http://127.0.0.1:8000/docs/") is None and s.why_not("http://127.0.0.1:8001/docs/") is not None
    assert "include" in s.why_not("http://example.org/blog/")
    assert "exclude" in s.why_not("http://example.org/docs/x.zip")


# --------------------------------------------------------------------------------------------- resume

KILL_SCRIPT = """
import sys, json
from tasks.artifacts import ArtifactStore
from tasks.crawl import CrawlConfig, CrawlStage
from tasks.stage import run_in_store
cfg = CrawlConfig.model_validate(json.loads(sys.argv[2]))
art = run_in_store(CrawlStage(), cfg, [], ArtifactStore(sys.argv[1]))
print(art.path)
"""


def _site_for_resume() -> dict[str, Route]:
    routes = {"/": Route(article("Home", links=[f"/s{i}" for i in range(25)]))}
    for i in range(25):
        routes[f"/s{i}"] = Route(article(f"Section {i}", f"Section {i} text.", links=[f"/s{i}/p{j}" for j in range(3)]))
        for j in range(3):
            routes[f"/s{i}/p{j}"] = Route(
                article(f"Page {i}.{j}", f"Page {i}.{j} text.", links=["/", f"/s{(i + 1) % 25}"])
            )
    routes["/robots.txt"] = Route(b"User-agent: *\nDisallow: /s7/\nCrawl-delay: 0.03\n", content_type="text/plain")
    return routes


def _comparable(art):
    docs = art.read_table().to_pylist()
    for d in docs:  # when a page was fetched differs between two crawls; nothing else may
        meta = json.loads(d["meta"])
        meta.pop("fetched_at")
        d["meta"] = meta
    rejects = art.read_table(table="rejects").to_pylist()
    for r in rejects:
        r["meta"] = {k: v for k, v in json.loads(r["meta"]).items() if k != "fetched_at"}
    return docs, rejects


@pytest.mark.slow
def test_sigkill_half_way_then_rerun_equals_uninterrupted_crawl(tmp_path, sites):
    a = sites("127.0.0.1", _site_for_resume())
    src = web(seeds=[a.origin + "/"], max_depth=3, max_pages=80, per_host_delay=0.0, respect_robots=True)
    cfg = CrawlConfig(sources=[src], extract_workers=0)
    fp = CrawlStage().fingerprint(cfg, [])
    root = str(tmp_path / "killed")
    journal = os.path.join(root, "crawl", f".staging-{fp}", "_scratch", "00000", "web-journal.jsonl")

    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, root, cfg.model_dump_json()], cwd=os.getcwd())
    deadline = time.monotonic() + 60
    pages_before_kill = 0
    while time.monotonic() < deadline:
        if os.path.exists(journal):
            with open(journal, "rb") as f:
                pages_before_kill = f.read().count(b'{"t":"page"')
            if pages_before_kill >= 35:
                break
        assert proc.poll() is None, "the crawl finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)  # requests the killed process had already sent may still be arriving
    assert not ArtifactStore(root).is_committed("crawl", fp)
    requests_before = len(a.hits)

    resumed = run_in_store(CrawlStage(), cfg, [], ArtifactStore(root))
    requests_resumed = len(a.hits) - requests_before
    assert resumed.stats.extra["web_pages_resumed"] >= 35
    # journaled pages are not fetched again (robots.txt is journaled too)
    assert requests_resumed <= 80 - resumed.stats.extra["web_pages_resumed"] + 1
    assert "/robots.txt" not in [h.path for h in a.hits[requests_before:]]
    starts = sorted(h.start for h in a.hits[requests_before:])
    assert min(y - x for x, y in zip(starts, starts[1:])) >= 0.03 - 0.005  # the journaled Crawl-delay still holds

    fresh = run_in_store(CrawlStage(), cfg, [], ArtifactStore(str(tmp_path / "fresh")))
    assert resumed.fingerprint == fresh.fingerprint
    assert resumed.num_rows == fresh.num_rows > 50
    assert _comparable(resumed) == _comparable(fresh)
    assert resumed.stats.rejected == fresh.stats.rejected
    assert resumed.stats.rejected["robots_denied"] == 3 and resumed.stats.rejected["max_pages"] > 0
    assert not os.path.exists(os.path.join(resumed.path, "_scratch"))  # the journal went with the commit
