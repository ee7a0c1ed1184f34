"""Regenerate examples/data/: real English text (the standard library's module docstrings) as JSONL and
text files, plus a file of deliberately broken records that the demo's ingest must reject with reasons.

    python examples/make_sample_data.py
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings

OUT = os.path.join(os.path.dirname(__file__), "data")


def docstrings() -> list[tuple[str, str]]:
    found = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        doc = (mod.__doc__ or "").strip()
        if len(doc) >= 200:
            found.append((name, doc))
    return found


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    docs = docstrings()
    with open(os.path.join(OUT, "stdlib_docstrings.jsonl"), "w", encoding="utf-8") as f:
        for name, doc in docs[20:]:
            f.write(
                json.dumps(
                    {
                        "id": f"stdlib/{name}",
                        "text": doc,
                        "url": f"https://docs.python.org/3/library/{name}.html",
                        "module": name,
                    }
                )
                + "\n"
            )
    text_dir = os.path.join(OUT, "text")
    os.makedirs(text_dir, exist_ok=True)
    for name, doc in docs[:20]:
        with open(os.path.join(text_dir, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(doc + "\n")
    with open(os.path.join(OUT, "broken_records.jsonl"), "wb") as f:
        f.write(b'{"id": "ok-1", "text": "A good record among bad ones: it must be kept."}\n')
        f.write(b'{"id": "bad-json", "text": "unterminated\n')
        f.write(b'{"id": "bad-utf8", "text": "caf\xe9 latin-1 bytes"}\n')
        f.write(b'{"id": "no-text", "body": "the text is under another key"}\n')
        f.write(b'{"id": "number", "text": 42}\n')
        f.write(b'{"id": "empty", "text": "   "}\n')
        f.write(b'["not", "an", "object"]\n')
    print(f"{len(docs)} docstrings -> {OUT}")


if __name__ == "__main__":
    main()
