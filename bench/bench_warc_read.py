"""Reading a .warc.gz: Kiln's strict member-by-member reader against warcio's own iteration.

Writes N response records (one gzip member each, as Common Crawl does) with warcio, then times
`tasks.crawl.warc.iter_warc` (every member decompressed with its CRC-32 checked, payloads read, digests
checked) and a plain `warcio.ArchiveIterator` pass that reads the same payloads with the same digest check.
Extraction is not included: it costs far more per record than either read. See BENCHMARKS.md.

    .venv/bin/python bench/bench_warc_read.py [--records 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from warcio.archiveiterator import ArchiveIterator
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from tasks.crawl.warc import iter_warc

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for i in range(args.records):
        body = (f"<html><body><p>Page {i}. " + "Some words of a page. " * 100 + "</p></body></html>").encode()
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(
            w.create_warc_record(f"http://site.test/p{i}", "response", payload=io.BytesIO(body), http_headers=http)
        )
    data = buf.getvalue()

    def kiln() -> int:
        return sum(1 for it in iter_warc(io.BytesIO(data), 1 << 20) if "error" not in it)

    def warcio() -> int:
        n = 0
        for rec in ArchiveIterator(io.BytesIO(data), arc2warc=True, check_digests=True):
            rec.content_stream().read()
            n += rec.rec_type == "response"
        return n

    print(f"{args.records} records, {len(data) / 1e6:.2f} MB compressed")
    for name, fn in (("kiln iter_warc", kiln), ("warcio ArchiveIterator", warcio)):
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            n = fn()
            best = min(best, time.perf_counter() - t)
        assert n == args.records, (name, n)
        print(f"{name:24s} {best:.3f} s  ({best / args.records * 1e6:.1f} µs a record)")


if __name__ == "__main__":
    main()
