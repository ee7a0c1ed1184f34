"""Crawl throughput against a local site spread over several loopback hosts, with politeness measured
on the server side.

A separate server process serves HOSTS sites (127.0.0.1, 127.0.0.2, ...), each PAGES_PER_HOST
article pages linked into a graph (with a few cross-host links), answering every request after a
fixed service time. It records, per host, every request's arrival time and how many requests were in
flight at once. The crawl stage (the real one: robots.txt, scope, extraction, journal, Parquet) then
crawls all hosts, and the bench prints pages/s and whether any host ever saw more than the configured
concurrency or rate.

    .venv/bin/python bench/bench_crawl.py [--hosts 8] [--pages-per-host 400] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WORDS = (
    "crawler politeness frontier robots extraction paragraph document corpus token language model "
    "training data quality filter shard artifact pipeline stage host delay budget depth"
).split()


def page_html(host: int, page: int, hosts: int, pages: int, port: int) -> bytes:
    rng = random.Random(host * 100_000 + page)
    paragraphs = "".join(
        "<p>" + " ".join(rng.choice(WORDS) for _ in range(60)).capitalize() + ".</p>" for _ in range(5)
    )
    links = [f"/p{(page * 7 + k * 13 + 1) % pages}.html" for k in range(8)]
    links += [f"http://127.0.0.{(host + k) % hosts + 1}:{port}/p{(page + k) % pages}.html" for k in (1, 2)]
    nav = "".join(f'<li><a href="{href}">related {i}</a></li>' for i, href in enumerate(links))
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Host {host} page {page}</title></head>'
        f"<body><nav><ul>{nav}</ul></nav><main><article><h1>Host {host}, page {page}</h1>{paragraphs}"
        f"</article></main><footer>footer</footer></body></html>"
    ).encode()


def serve(hosts: int, pages: int, port: int, service_s: float, ready, stats_path: str, stop) -> None:
    """The server process: one asyncio server per loopback address, HTTP/1.1 keep-alive."""

    async def main() -> None:
        in_flight = [0] * hosts
        max_in_flight = [0] * hosts
        arrivals: list[list[float]] = [[] for _ in range(hosts)]
        bodies = {}

        def response(status: str, body: bytes, ctype: str) -> bytes:
            return (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: keep-alive\r\n\r\n"
            ).encode() + body

        def handler_for(h: int):
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    while True:
                        head = await reader.readuntil(b"\r\n\r\n")
                        path = head.split(b" ", 2)[1].decode()
                        arrivals[h].append(time.monotonic())
                        in_flight[h] += 1
                        max_in_flight[h] = max(max_in_flight[h], in_flight[h])
                        await asyncio.sleep(service_s)
                        if path == "/robots.txt":
                            out = response("200 OK", b"User-agent: *\nAllow: /\n", "text/plain")
                        elif (
                            path.startswith("/p")
                            and path.endswith(".html")
                            and path[2:-5].isdigit()
                            and int(path[2:-5]) < pages
                        ):
                            key = (h, int(path[2:-5]))
                            if key not in bodies:
                                bodies[key] = page_html(h, key[1], hosts, pages, port)
                            out = response("200 OK", bodies[key], "text/html; charset=utf-8")
                        else:
                            out = response("404 Not Found", b"not found", "text/plain")
                        writer.write(out)
                        in_flight[h] -= 1  # before the next await: the client cannot have seen the bytes yet
                        await writer.drain()
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    pass
                finally:
                    writer.close()

            return handle

        servers = [
            await asyncio.start_server(handler_for(h), f"127.0.0.{h + 1}", port, backlog=512) for h in range(hosts)
        ]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for s in servers:
            s.close()
        with open(stats_path, "w") as f:
            json.dump({"max_in_flight": max_in_flight, "arrivals": arrivals}, f)

    asyncio.run(main())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def window_peak(times: list[float], window: float) -> int:
    """Most requests that arrived within any `window` seconds."""
    peak, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        peak = max(peak, i - j + 1)
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--pages-per-host", type=int, default=400)
    parser.add_argument("--per-host-concurrency", type=int, default=4)
    parser.add_argument("--per-host-delay", type=float, default=0.005, help="seconds between request starts per host")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--service-ms", type=float, default=15.0, help="server time per response")
    parser.add_argument(
        "--workers", type=int, default=None, help="extraction processes (0: a thread; default: one per core but one)"
    )
    args = parser.parse_args()

    from tasks.artifacts import ArtifactStore
    from tasks.crawl import CrawlConfig, CrawlStage, WebSource
    from tasks.stage import run_in_store

    port = free_port()
    tmp = tempfile.mkdtemp(prefix="kiln-bench-crawl-")
    stats_path = os.path.join(tmp, "server.json")
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(
        target=serve,
        args=(args.hosts, args.pages_per_host, port, args.service_ms / 1000, ready, stats_path, stop),
        daemon=True,
    )
    server.start()
    ready.wait(30)
    # The server is the measuring instrument: it keeps the CPU priority, so that its arrival times are
    # when requests arrived and not when a starved server got round to reading them.
    os.nice(10)

    total_pages = args.hosts * args.pages_per_host
    src = WebSource(
        name="bench",
        seeds=[f"http://127.0.0.{h + 1}:{port}/p0.html" for h in range(args.hosts)],
        allowed_domains=[f"127.0.0.{h + 1}" for h in range(args.hosts)],
        allow_private=True,
        max_depth=50,
        max_pages=total_pages,
        concurrency=args.concurrency,
        per_host_concurrency=args.per_host_concurrency,
        per_host_delay=args.per_host_delay,
        page_retries=0,
    )
    cfg = CrawlConfig(sources=[src], extract_workers=args.workers)
    t0 = time.perf_counter()
    art = run_in_store(CrawlStage(), cfg, [], ArtifactStore(os.path.join(tmp, "store")))
    seconds = time.perf_counter() - t0
    stop.set()
    server.join(30)
    with open(stats_path) as f:
        seen = json.load(f)

    st = art.stats
    docs = st.rows_out
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"site: {args.hosts} hosts x {args.pages_per_host} pages, server {args.service_ms:g} ms per response")
    print(
        f"crawl: concurrency {args.concurrency}, per host {args.per_host_concurrency} in flight and "
        f"{args.per_host_delay:g} s between starts, extract_workers {cfg.extraction_processes()}"
    )
    print(
        f"documents: {docs} of {total_pages} pages; requests {st.extra['web_requests']}; "
        f"rejected {st.rows_rejected} {dict(st.rejected)}"
    )
    print(f"wall: {seconds:.2f} s for the whole stage (fetch, extract, journal, Parquet)")
    crawl_s = st.extra["web_crawl_seconds"]
    print(
        f"throughput: {docs / seconds:.0f} pages/s for the whole stage; {docs / crawl_s:.0f} pages/s while "
        f"crawling ({crawl_s:.2f} s: fetch + extract + journal, before the Parquet output)"
    )
    ok = True
    print(
        "per host, measured by the server: most requests in flight at once; most requests arriving within any "
        "1 s and any 0.1 s window; gaps between consecutive arrivals"
    )
    delay = args.per_host_delay
    for h in range(args.hosts):
        times = sorted(seen["arrivals"][h])
        gaps = [b - a for a, b in zip(times, times[1:])]
        flight = seen["max_in_flight"][h]
        host_ok = flight <= args.per_host_concurrency
        windows = []
        for w in (1.0, 0.1):
            peak, limit = window_peak(times, w), int(w / delay + 1e-9) + 1 if delay else None
            host_ok &= limit is None or peak <= limit
            windows.append(f"{peak}/{w:g}s (limit {limit})")
        ok &= host_ok
        print(
            f"  127.0.0.{h + 1}: {len(times)} requests, in flight {flight} (limit {args.per_host_concurrency}), "
            f"{', '.join(windows)}, gaps min {min(gaps) * 1000:.2f} / p1 {percentile(gaps, 0.01) * 1000:.2f} / "
            f"median {percentile(gaps, 0.5) * 1000:.2f} ms (delay {delay * 1000:g} ms) "
            f"{'ok' if host_ok else 'VIOLATION'}"
        )
    print(f"politeness: {'held on every host' if ok else 'VIOLATED'}")
    print(
        f"target of 300 pages/s for the whole stage: {'met' if docs / seconds >= 300 else 'missed'} "
        "(throughput depends on what else the machine runs; politeness must hold regardless)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
