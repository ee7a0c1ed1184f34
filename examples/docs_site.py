"""The demo's web site: Python's standard-library documentation, rendered by pydoc, served on 127.0.0.1.

Every machine with Python has it, it is real documentation (hundreds of linked pages), and nothing
leaves the machine. Pages are pydoc's own HTML (what `python -m pydoc -w MODULE` writes) for the
standard library's public modules and their submodules, plus an index page linking them all, so
the crawl follows real links: module to module, and out to file: URLs and docs.python.org, which the
crawler refuses or leaves out of scope.

    python examples/docs_site.py build                 # write the pages (cached per Python version)
    python examples/docs_site.py serve --port 8765     # serve them until Ctrl-C
    python examples/docs_site.py run --port 8765 -- kiln run configs/demo.yaml
                                                       # serve while a command runs, then stop
"""

from __future__ import annotations

import argparse
import html
import http.server
import importlib
import io
import json
import os
import pkgutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from functools import partial

DEFAULT_DIR = os.path.join(".kiln", "docs_site")
DEFAULT_PORT = 8765
STAMP = "_build.json"
# Modules with side effects on import (a browser, a GUI, printing), or internal to CPython.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "pydoc_data",
    "ensurepip",
    "venv",
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "nt",
    "_winapi",
    "__hello__",
    "__phello__",
    "__main__",
    "_testcapi",
    "_testinternalcapi",
    "_testbuffer",
    "_testimportmultiple",
    "_testmultiphase",
    "_xxsubinterpreters",
    "_xxtestfuzz",
    "_ctypes_test",
    "_testclinic",
    "_testsinglephase",
    "sre_compile",
    "sre_constants",
    "sre_parse",
    "xxsubtype",
    "xxlimited",
    "xxlimited_35",
}
MAX_SUBMODULES_PER_PACKAGE = 60


def stdlib_modules() -> list[str]:
    """Standard-library modules importable here, with the submodules of packages. Private ones
    (`_socket`, `concurrent.futures._base`) are in: pydoc's pages link to them."""
    names: set[str] = set()
    for top in sorted(sys.stdlib_module_names):
        if top in SKIP:
            continue
        mod = _import(top)
        if mod is None or not _in_stdlib(mod):
            continue
        names.add(top)
        if hasattr(mod, "__path__"):
            subs = []
            for info in pkgutil.walk_packages(mod.__path__, prefix=top + ".", onerror=lambda _name: None):
                parts = info.name.split(".")
                if "test" in parts or "tests" in parts or parts[-1] == "__main__" or "windows" in parts[-1]:
                    continue
                subs.append(info.name)
            names.update(sorted(subs)[:MAX_SUBMODULES_PER_PACKAGE])
    return sorted(names)


def _in_stdlib(mod) -> bool:
    """False for what a virtual environment slips in under a standard name (setuptools' distutils)."""
    path = getattr(mod, "__file__", None)
    if path is None:  # built into the interpreter
        return True
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    return (
        any(os.path.realpath(path).startswith(os.path.realpath(r) + os.sep) for r in roots)
        and "site-packages" not in path
    )


def _import(name: str):
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # ImportError, a missing C library, SystemExit from a script-like module
        return None


def build(directory: str = DEFAULT_DIR, force: bool = False) -> int:
    """Write one pydoc page per module, an index and a robots.txt; returns the number of pages."""
    import pydoc

    stamp_path = os.path.join(directory, STAMP)
    if not force and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            stamp = json.load(f)
        if stamp.get("python") == sys.version:
            return stamp["pages"]
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):  # a rebuild must not keep pages of modules no longer documented
        if old.endswith(".html"):
            os.remove(os.path.join(directory, old))
    t0 = time.perf_counter()
    written: list[str] = []
    for name in stdlib_modules():
        mod = _import(name)
        if mod is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                page = pydoc.html.page(pydoc.describe(mod), pydoc.html.document(mod, name))
        except Exception:  # pydoc cannot render every object of every module
            continue
        with open(os.path.join(directory, f"{name}.html"), "w", encoding="utf-8") as f:
            f.write(page)
        written.append(name)
    items = "\n".join(f'<li><a href="{html.escape(n)}.html">{html.escape(n)}</a></li>' for n in written)
    with open(os.path.join(directory, "index.html"), "w", encoding="utf-8") as f:
        f.write(
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Python {sys.version.split()[0]} standard library (pydoc)</title></head><body>"
            f"<h1>Python {sys.version.split()[0]} standard library</h1>"
            f"<p>Module documentation generated by pydoc for {len(written)} modules.</p>"
            f"<ul>{items}</ul></body></html>"
        )
    with open(os.path.join(directory, "robots.txt"), "w") as f:
        f.write("User-agent: *\nAllow: /\n")
    with open(stamp_path, "w") as f:
        json.dump({"python": sys.version, "pages": len(written), "seconds": round(time.perf_counter() - t0, 1)}, f)
    return len(written)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def start_server(directory: str, port: int, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((host, port), partial(_QuietHandler, directory=directory))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="docs-site", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "serve", "run"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=DEFAULT_DIR, help="Where the pages are written.")
        if name != "build":
            p.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port on 127.0.0.1.")
        else:
            p.add_argument("--force", action="store_true", help="Rebuild even if the pages exist.")
    argv = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in argv:
        cmd = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    args = parser.parse_args(argv)

    pages = build(args.dir, force=getattr(args, "force", False))
    print(f"docs site: {pages} pydoc pages in {args.dir}", file=sys.stderr)
    if args.command == "build":
        return 0
    try:
        server = start_server(args.dir, args.port)
    except OSError as e:
        print(
            f"docs site: cannot listen on 127.0.0.1:{args.port}: {e.strerror or e}. Another demo (or another "
            f"program) holds the port; stop it, or serve on another port and point the config's crawl seed "
            f"at it (the demo config's seed is http://127.0.0.1:{DEFAULT_PORT}/).",
            file=sys.stderr,
        )
        return 2
    print(f"docs site: serving http://127.0.0.1:{args.port}/", file=sys.stderr)
    try:
        if args.command == "serve":
            while True:
                time.sleep(3600)
        if not cmd:
            parser.error("run needs a command after --")
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
