"""WARC ingest: real WARC files written with warcio, whole, damaged, local and behind fsspec URLs."""

from __future__ import annotations

import io
import json

import fsspec
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks.artifacts import ArtifactStore
from tasks.crawl import CrawlConfig, CrawlStage, WarcSource
from tasks.crawl.extract import analyse_page
from tasks.crawl.warc import iter_warc
from tasks.stage import StageInputError, run_in_store

PARAGRAPH = (
    "Common Crawl publishes its archive as WARC files. Each response record holds the HTTP headers and "
    "the payload of one fetched page, and the ingest turns the HTML into the main text of the page. "
)


def html(title: str, body: str) -> bytes:
    return (
        f"<html><head><title>{title}</title></head><body><nav>Menu Home About</nav><article><h1>{title}</h1>"
        f"<p>{body} {PARAGRAPH * 3}</p></article><footer>Footer</footer></body></html>"
    ).encode()


def response(
    w: WARCWriter,
    url: str,
    body: bytes,
    content_type: str | None = "text/html; charset=utf-8",
    status: str = "200 OK",
    extra: list[tuple[str, str]] = (),
) -> None:
    headers = [("Content-Length", str(len(body))), *extra]
    if content_type:
        headers.append(("Content-Type", content_type))
    http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
    w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))


def sample_records(w: WARCWriter) -> None:
    w.write_record(w.create_warcinfo_record("sample.warc", {"software": "kiln tests"}))
    w.write_record(
        w.create_warc_record(
            "http://site.test/a",
            "request",
            payload=io.BytesIO(b"GET /a HTTP/1.1\r\n\r\n"),
            warc_content_type="application/http; msgtype=request",
        )
    )
    response(w, "http://site.test/a", html("Page A", "Alpha."))
    response(w, "http://site.test/b#frag", html("Page B", "Beta."))
    response(w, "http://site.test/doc.pdf", b"%PDF-1.4 ...", content_type="application/pdf")
    response(w, "http://site.test/gone", b"<html>gone</html>", status="404 Not Found")
    response(w, "http://site.test/moved", b"", status="301 Moved Permanently", extra=[("Location", "/a")])
    response(
        w,
        "http://site.test/latin",
        f"<html><body><article><p>Un caf\xe9 pr\xe8s de la gare. {PARAGRAPH * 3}</p></article></body></html>".encode(
            "latin-1"
        ),
        content_type="text/html",
    )
    response(w, "http://site.test/empty", b"<html><body></body></html>")
    response(w, "http://site.test/big", html("Big", "x" * 50_000))
    w.write_record(
        w.create_warc_record(
            "http://site.test/notes.txt",
            "resource",
            payload=io.BytesIO(PARAGRAPH.encode()),
            warc_content_type="text/plain",
        )
    )
    w.write_record(
        w.create_warc_record(
            "http://site.test/a",
            "conversion",
            payload=io.BytesIO(b"Extracted WET text. " + PARAGRAPH.encode()),
            warc_content_type="text/plain",
        )
    )


def write_warc(path, gz: bool, records=sample_records) -> bytes:
    buf = io.BytesIO()
    records(WARCWriter(buf, gzip=gz))
    data = buf.getvalue()
    with fsspec.open(str(path), "wb") as f:
        f.write(data)
    return data


def ingest(tmp_path, *paths, store="store", **kw):
    cfg = CrawlConfig(
        sources=[WarcSource(paths=[str(p) for p in paths], max_body_bytes=16 * 1024, **kw)], extract_workers=0
    )
    return run_in_store(CrawlStage(), cfg, [], ArtifactStore(str(tmp_path / store)))


@pytest.mark.parametrize("gz", [False, True])
def test_records_become_documents_or_rejects(tmp_path, gz):
    path = tmp_path / ("sample.warc.gz" if gz else "sample.warc")
    write_warc(path, gz)
    art = ingest(tmp_path, path)
    st = art.stats
    docs = art.read_table().to_pylist()
    rejects = {r["url"]: r for r in art.read_table(table="rejects").to_pylist()}
    assert st.rows_in == st.rows_out + st.rows_rejected == 10  # response + resource + conversion records
    assert st.extra["warc_other_records"] == 2 and st.extra["warc_records"] == 12  # warcinfo, request
    assert [d["url"] for d in docs] == [
        "http://site.test/a",
        "http://site.test/b",
        "http://site.test/latin",
        "http://site.test/notes.txt",
        "http://site.test/a",
    ]  # file order
    assert {u: r["reason"] for u, r in rejects.items()} == {
        "http://site.test/doc.pdf": "content_type",
        "http://site.test/gone": "http_404",
        "http://site.test/moved": "http_301",
        "http://site.test/empty": "empty_extraction",
        "http://site.test/big": "too_large",
    }
    a = docs[0]
    meta = json.loads(a["meta"])
    assert meta["title"] == "Page A" and meta["status"] == 200 and meta["warc_type"] == "response"
    assert meta["warc_record_id"].startswith("<urn:uuid:") and meta["fetched_at"] and meta["warc_file"] == str(path)
    # the same extraction as a crawled page
    assert a["text"] == analyse_page(html("Page A", "Alpha."), "http://site.test/a", "text/html")["text"]
    assert "Alpha." in a["text"] and "Footer" not in a["text"]
    assert "Un café près de la gare." in docs[2]["text"]
    assert (
        docs[4]["text"].startswith("Extracted WET text.") and json.loads(docs[4]["meta"])["warc_type"] == "conversion"
    )
    assert len({d["id"] for d in docs}) == 5
    report = {r["host"]: r for r in art.read_table(table="report").to_pylist()}
    assert report["site.test"]["documents"] == 5 and report["site.test"]["rows"] == 10


def _many(w: WARCWriter) -> None:
    for i in range(6):
        response(w, f"http://site.test/p{i}", html(f"Page {i}", f"Number {i}."))


def _damaged_member(tmp_path) -> bytes:
    data = bytearray(write_warc(tmp_path / "ok.warc.gz", True, _many))
    members = [i for i in range(len(data)) if data[i : i + 3] == b"\x1f\x8b\x08"]
    assert len(members) == 6
    damaged = members[2] + 40
    data[damaged : damaged + 30] = b"\x00" * 30  # inside the compressed body of record 2
    return bytes(data)


def test_corrupt_gzip_member_is_counted_and_the_rest_kept(tmp_path):
    (tmp_path / "bad.warc.gz").write_bytes(_damaged_member(tmp_path))
    art = ingest(tmp_path, tmp_path / "bad.warc.gz")
    urls = [d["url"] for d in art.read_table().to_pylist()]
    assert urls == [f"http://site.test/p{i}" for i in (0, 1, 3, 4, 5)]
    assert art.stats.rejected == {"corrupt_record": 1}
    assert art.stats.rows_in == 6


def test_a_damaged_member_never_turns_into_garbage_records(tmp_path, capsys):
    # Each file has fresh record ids, so the same damage lands on other compressed bytes. On about one
    # file in ten, warcio's reader wrote the deflate error to stderr and read the next members' compressed
    # bytes as plain text: garbage records, and the good records after the damage lost.
    for _ in range(40):
        items = list(iter_warc(io.BytesIO(_damaged_member(tmp_path)), 16 * 1024))
        assert [it.get("uri") for it in items if "error" not in it] == [
            f"http://site.test/p{i}" for i in (0, 1, 3, 4, 5)
        ]
        assert [it["error"][:5] for it in items if "error" in it] == ["error"]  # zlib's error, once
    assert "decompress" not in capsys.readouterr().err


def test_a_file_compressed_as_one_gzip_member(tmp_path):
    import gzip

    one = gzip.compress(write_warc(tmp_path / "plain.warc", False, _many))  # not per record: one member
    whole = list(iter_warc(io.BytesIO(one), 16 * 1024))
    assert [it["uri"] for it in whole] == [f"http://site.test/p{i}" for i in range(6)]
    cut = list(iter_warc(io.BytesIO(one[: len(one) * 3 // 4]), 16 * 1024))
    kept = [it["uri"] for it in cut if "error" not in it and not it["truncated"]]
    assert kept == [f"http://site.test/p{i}" for i in range(len(kept))] and len(kept) >= 3
    assert len(cut) == len(kept) + 1 and (cut[-1].get("reason") == "truncated_record" or cut[-1]["truncated"])


def test_truncated_files_keep_their_whole_records(tmp_path):
    gz = write_warc(tmp_path / "full.warc.gz", True, _many)
    (tmp_path / "cut.warc.gz").write_bytes(gz[: len(gz) - 200])
    (tmp_path / "cut-head.warc.gz").write_bytes(gz[: gz.rindex(b"\x1f\x8b\x08") + 60])  # inside the last header
    plain = write_warc(tmp_path / "full.warc", False, _many)
    (tmp_path / "cut.warc").write_bytes(plain[: len(plain) - 300])
    for name in ("cut.warc.gz", "cut-head.warc.gz", "cut.warc"):
        art = ingest(tmp_path, tmp_path / name, store="store-" + name)
        assert [d["url"] for d in art.read_table().to_pylist()] == [f"http://site.test/p{i}" for i in range(5)], name
        assert art.stats.rejected == {"truncated_record": 1}, name


def test_altered_payload_fails_its_digest(tmp_path):
    data = bytearray(write_warc(tmp_path / "x.warc", False, _many))
    i = data.index(b"Number 3.")
    data[i : i + 9] = b"Number 9!"
    (tmp_path / "altered.warc").write_bytes(bytes(data))
    art = ingest(tmp_path, tmp_path / "altered.warc")
    assert art.stats.rejected == {"digest_mismatch": 1}
    assert "Number 9!" not in " ".join(art.read_table().column("text").to_pylist())


def test_fsspec_urls_globs_and_directories(tmp_path):
    write_warc("memory://kiln-warc/crawl-1.warc.gz", True, _many)
    write_warc("memory://kiln-warc/crawl-2.warc", False)
    art = ingest(tmp_path, "memory://kiln-warc/*.warc*")
    assert art.manifest["units"] == 2 and art.stats.extra["warc_files"] == 2
    assert art.num_rows == 6 + 5
    warc_file = json.loads(art.head(1)[0]["meta"])["warc_file"]
    assert warc_file.startswith("memory://") and warc_file.endswith("/kiln-warc/crawl-1.warc.gz")
    d = tmp_path / "dir"
    d.mkdir()
    write_warc(d / "one.warc.gz", True, _many)
    (d / "readme.txt").write_text("not a WARC")
    assert ingest(tmp_path, d, store="s2").num_rows == 6


def test_include_exclude_and_missing_paths(tmp_path):
    write_warc(tmp_path / "s.warc.gz", True, _many)
    art = ingest(tmp_path, tmp_path / "s.warc.gz", include=[r"/p[0-3]$"], exclude=[r"/p1$"])
    assert [d["url"] for d in art.read_table().to_pylist()] == [f"http://site.test/p{i}" for i in (0, 2, 3)]
    assert art.stats.rejected == {"out_of_scope": 3}
    with pytest.raises(StageInputError, match=r"sources\[0\]\.paths\[1\]: no such file"):
        ingest(tmp_path, tmp_path / "s.warc.gz", tmp_path / "missing.warc.gz")
    with pytest.raises(StageInputError, match=r"sources\[0\]\.paths\[0\]: no files match"):
        ingest(tmp_path, tmp_path / "*.nothing")


def test_changed_file_changes_the_fingerprint(tmp_path):
    p = tmp_path / "s.warc.gz"
    write_warc(p, True, _many)
    cfg = CrawlConfig(sources=[WarcSource(paths=[str(p)])])
    fp = CrawlStage().fingerprint(cfg, [])
    write_warc(p, True)
    assert CrawlStage().fingerprint(cfg, []) != fp
