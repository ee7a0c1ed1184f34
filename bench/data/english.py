"""English documents from real text shipped in packages: the docstrings of the Python standard library
and of every package installed in this virtual environment (numpy, scipy, pyarrow, prefect, ...).

Docstrings of at least `min_words` words, de-duplicated on normalised text, in a deterministic
(sorted file) order, cached as Parquet under the cache directory.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq


def _roots() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["stdlib"], paths["purelib"], paths["platlib"]})


def docstrings(limit: int, min_words: int = 40) -> list[str]:
    from tasks.dedup.hashing import normalise_for_dedup

    seen: set[str] = set()
    out: list[str] = []
    for root in _roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages") or root.endswith("site-packages"))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc.split()) >= min_words:
                            key = normalise_for_dedup(doc)
                            if key not in seen:
                                seen.add(key)
                                out.append(doc)
                                if len(out) >= limit:
                                    return out
    return out


def corpus(cache: str, limit: int) -> list[str]:
    path = os.path.join(cache, f"docstrings-{limit}-py{sys.version_info.major}{sys.version_info.minor}.parquet")
    if os.path.exists(path):
        return pq.read_table(path).column("text").to_pylist()
    docs = docstrings(limit)
    os.makedirs(cache, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path)
    return docs
