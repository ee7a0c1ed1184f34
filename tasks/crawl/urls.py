"""URL normalisation, crawl scope, and the address check that keeps a crawler off private networks.

Two spellings of one resource must normalise to one string, or the crawl fetches it twice and the
corpus holds it twice: scheme and host lower case, default ports and fragments dropped, dot segments
resolved, percent-escapes made canonical (upper-case hex, unreserved characters decoded).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from functools import lru_cache
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

CRAWLABLE_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
# Links that point at no fetchable document at all: not worth a row in the rejects.
NON_LINK_SCHEMES = ("javascript", "mailto", "tel", "data", "about", "sms", "callto", "blob")
MAX_URL_CHARS = 4096

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = "/?:@!$&'()*+,;=-._~%"


# Strings made only of these need no escaping work at all: the common case, worth a fast path.
_PLAIN = {
    _PATH_SAFE: re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~-]*"),
    _QUERY_SAFE: re.compile(r"[A-Za-z0-9/?:@!$&'()*+,;=._~-]*"),
}


def _canonical_escapes(s: str, safe: str) -> str:
    if _PLAIN[safe].fullmatch(s):
        return s

    def fix(m: re.Match) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()

    # quote() escapes what must be escaped (spaces, non-ASCII as UTF-8) and leaves existing escapes;
    # the regex then gives every escape one spelling.
    return _ESCAPE.sub(fix, quote(s, safe=safe, encoding="utf-8", errors="surrogatepass"))


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, for an absolute path."""
    segments = path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg in (".", ".."):
            if seg == ".." and len(out) > 1:
                out.pop()
            if last:  # "/a/b/.." names the directory "/a/", trailing slash included
                out.append("")
            continue
        out.append(seg)
    return "/".join(out) or "/"


@lru_cache(maxsize=4096)
def _host(hostname: str) -> str | None:
    host = hostname.strip().rstrip(".").lower()
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
        return f"[{host}]" if ":" in host else host
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not re.fullmatch(r"[a-z0-9_.-]+", host):
        return None
    return host


def normalize_url(url: str, base: str | None = None, sort_query: bool = False) -> str | None:
    """The canonical form of an absolute http(s) URL, or the URL resolved but untouched for any other
    scheme; None when it cannot be parsed."""
    url = url.strip()
    if not url or len(url) > MAX_URL_CHARS:
        return None
    try:
        if base:
            url = urljoin(base, url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in CRAWLABLE_SCHEMES:
            return url if scheme else None
        host = _host(parts.hostname or "")
        port = parts.port
    except ValueError:  # a bad port, a broken IPv6 literal
        return None
    if host is None:
        return None
    netloc = host if port is None or port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _remove_dot_segments(_canonical_escapes(parts.path or "/", _PATH_SAFE) or "/")
    if not path.startswith("/"):
        path = "/" + path
    query = _canonical_escapes(parts.query, _QUERY_SAFE) if parts.query else ""
    if sort_query and query:
        query = "&".join(sorted(query.split("&")))
    return urlunsplit((scheme, netloc, path, query, ""))


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


@lru_cache(maxsize=65536)
def origin_of(url: str) -> str:
    """scheme://host[:port] of a normalised URL: the unit of politeness (robots.txt, delay, concurrency)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@lru_cache(maxsize=65536)
def host_of(url: str) -> str:
    return urlsplit(url).netloc


class Scope:
    """Which URLs the crawl may follow: allowed hosts, then include / exclude regexes."""

    def __init__(self, allowed_domains: list[str], include: list[str], exclude: list[str]):
        self.domains = [d for d in allowed_domains if ":" not in d or d.startswith("[")]
        self.host_ports = [d for d in allowed_domains if ":" in d and not d.startswith("[")]
        self.include = [re.compile(p) for p in include]
        self.exclude = [re.compile(p) for p in exclude]

    @classmethod
    def for_seeds(cls, seeds: list[str], allowed_domains: list[str], include: list[str], exclude: list[str]) -> Scope:
        if not allowed_domains:
            allowed_domains = sorted({(urlsplit(s).hostname or "").lower() for s in seeds} - {""})
        return cls(allowed_domains, include, exclude)

    def why_not(self, url: str) -> str | None:
        """None if the URL is in scope, else a short explanation."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        in_domain = any(host == d or host.endswith("." + d) for d in self.domains)
        if not in_domain and parts.netloc not in self.host_ports:
            return f"host {parts.netloc} is not in allowed_domains"
        if self.include and not any(p.search(url) for p in self.include):
            return "matches no include pattern"
        for p in self.exclude:
            if p.search(url):
                return f"matches exclude pattern {p.pattern!r}"
        return None


def _is_public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


async def address_problem(url: str, allow_private: bool) -> tuple[str, str] | None:
    """(reason, detail) if the URL's host must not be contacted, None if it may.

    Every address the name resolves to is checked, so a public name pointing at 127.0.0.1 or
    169.254.169.254 (cloud metadata) is refused too.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        return "dns_error", f"{host}: {e}"
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        return "dns_error", f"{host}: no address"
    if allow_private:
        return None
    private = [a for a in addresses if not _is_public(a)]
    if private:
        return "private_address", f"{host} resolves to {', '.join(private)} (set allow_private to crawl it)"
    return None
