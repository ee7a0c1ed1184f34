"""English documents from real text shipped in packages: the docstrings of the Python standard library
and of every package installed in this virtual environment (numpy, scipy, pyarrow, prefect, ...).

Docstrings of at least `min_words` words, de-duplicated on normalised text, in a deterministic
(sorted file) order, cached as Parquet under the cache directory.

That tops out near 47k documents. `corpus(..., extra=True)` appends, after those (so the first 47k
are unchanged), the docstrings of the pinned wheels in EXTRA_WHEELS: not installed, only downloaded
with pip (no dependencies) into the cache and read from the zip, still real text, still de-duplicated
against everything before them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq


def _roots() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["stdlib"], paths["purelib"], paths["platlib"]})


# Docstring-rich packages not installed in the project's venv (pinned, so the corpus is reproducible).
EXTRA_WHEELS = [
    "django==5.2.8",
    "scikit-learn==1.7.2",
    "statsmodels==0.14.5",
    "astropy==7.1.1",
    "sphinx==8.2.3",
    "twisted==25.5.0",
    "sqlglot==27.29.0",
    "mypy==1.18.2",
    "biopython==1.88",
    "nltk==3.10.4",
    "xarray==2026.9.0",
    "jax==0.10.2",
    "numba==0.68.1",
    "scikit-image==0.26.0",
    "pyomo==6.10.1",
    "ipython==9.18.1",
    "hypothesis==6.170.17",
    "pylint==4.1.4",
    "pymc==5.28.5",
    "cvxpy==1.9.3",
    "docutils==0.23",
    "mne==1.13.2",
    "bokeh==3.9.2",
    "pennylane==0.45.1",
    "sunpy==7.0.5",
    "qiskit==2.6.2",
]


def _take(source: str, seen: set[str], out: list[str], limit: int, min_words: int) -> bool:
    """Append the new docstrings of one source file; True once `limit` is reached."""
    from tasks.dedup.hashing import normalise_for_dedup

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= min_words:
                key = normalise_for_dedup(doc)
                if key not in seen:
                    seen.add(key)
                    out.append(doc)
                    if len(out) >= limit:
                        return True
    return False


def _wheel(cache: str, spec: str) -> str:
    name, version = spec.split("==")
    wheels = os.path.join(cache, "wheels")
    os.makedirs(wheels, exist_ok=True)

    def find() -> str | None:
        norm = name.replace("-", "_").lower()
        for f in sorted(os.listdir(wheels)):
            if f.endswith(".whl") and f.lower().startswith(f"{norm}-{version}-"):
                return os.path.join(wheels, f)
        return None

    path = find()
    if path is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "-d",
                wheels,
                spec,
            ],
            check=True,
        )
        path = find()
        if path is None:
            raise SystemExit(f"pip download {spec} produced no wheel in {wheels}")
    return path


def extra_docstrings(cache: str, seen: set[str], out: list[str], limit: int, min_words: int = 40) -> None:
    for spec in EXTRA_WHEELS:
        with zipfile.ZipFile(_wheel(cache, spec)) as z:
            for member in sorted(z.namelist()):
                if member.endswith(".py"):
                    try:
                        source = z.read(member).decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    if _take(source, seen, out, limit, min_words):
                        return


def docstrings(limit: int, min_words: int = 40, seen: set[str] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    out: list[str] = []
    for root in _roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d not in ("__pycache__", "site-packages") or root.endswith("site-packages")
            )
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        source = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                if _take(source, seen, out, limit, min_words):
                    return out
    return out


def corpus(cache: str, limit: int, extra: bool = False) -> list[str]:
    """The installed docstrings, then (extra=True) those of EXTRA_WHEELS, up to `limit` documents."""
    tag = "-extra" if extra else ""
    path = os.path.join(cache, f"docstrings-{limit}{tag}-py{sys.version_info.major}{sys.version_info.minor}.parquet")
    if os.path.exists(path):
        return pq.read_table(path).column("text").to_pylist()
    if extra:
        from tasks.dedup.hashing import normalise_for_dedup

        docs = corpus(cache, limit)
        seen = {normalise_for_dedup(d) for d in docs}
        if len(docs) < limit:
            extra_docstrings(cache, seen, docs, limit)
    else:
        docs = docstrings(limit)
    os.makedirs(cache, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path)
    return docs
