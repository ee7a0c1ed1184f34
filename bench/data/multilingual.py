"""A labelled multilingual corpus from Django's translation catalogs (human translations, ~100 locales).

The Django wheel is fetched from PyPI with pip into a cache directory (nothing is committed); its
`locale/<lang>/LC_MESSAGES/django.po` files across all apps give the same UI messages in every
language. Messages (placeholders and markup removed) are grouped into documents of a few sentences.
English documents come from the catalogs' source strings (msgid).
"""

from __future__ import annotations

import glob
import io
import os
import random
import re
import subprocess
import sys
import zipfile

DJANGO = "django<6"
# Locale directory -> ISO 639-1 label as lid.176 names it.
LANGUAGES = {
    "de": "de",
    "fr": "fr",
    "es": "es",
    "it": "it",
    "pt": "pt",
    "nl": "nl",
    "ru": "ru",
    "pl": "pl",
    "ja": "ja",
    "zh_Hans": "zh",
    "ar": "ar",
    "tr": "tr",
    "sv": "sv",
    "ko": "ko",
    "el": "el",
    "uk": "uk",
    "cs": "cs",
    "fi": "fi",
    "hu": "hu",
    "vi": "vi",
    "he": "he",
}
_PLACEHOLDER = re.compile(r"%\(\w+\)[sdfr]|%[sdfr]|\{[^}]*\}|<[^>]+>|&\w+;")


def fetch_wheel(cache: str) -> str:
    os.makedirs(cache, exist_ok=True)
    found = glob.glob(os.path.join(cache, "[Dd]jango-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DJANGO, "-d", cache, "-q"],
            check=True,
        )
        found = glob.glob(os.path.join(cache, "[Dd]jango-*.whl"))
    return sorted(found)[-1]


def _clean(msg: str) -> str:
    return " ".join(_PLACEHOLDER.sub(" ", msg).split()).strip(" :")


def messages(wheel: str) -> dict[str, list[str]]:
    """label -> unique translated messages of >= 3 words (or >= 6 characters for CJK)."""
    import logging

    from babel.messages.pofile import read_po

    logging.disable(logging.WARNING)  # babel's plural-count warnings about a few catalogs

    out: dict[str, set[str]] = {"en": set()}
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = re.search(r"/locale/([^/]+)/LC_MESSAGES/django\.po$", name)
            if not m or m.group(1) not in LANGUAGES:
                continue
            label = LANGUAGES[m.group(1)]
            catalog = read_po(io.BytesIO(z.read(name)))
            for msg in catalog:
                if not msg.id or msg.fuzzy:
                    continue
                src = msg.id[0] if isinstance(msg.id, tuple) else msg.id
                dst = msg.string[0] if isinstance(msg.string, tuple) else msg.string
                for lab, text in (("en", src), (label, dst)):
                    t = _clean(text or "")
                    if len(t.split()) >= 3 or (lab in ("ja", "zh") and len(t) >= 6):
                        out.setdefault(lab, set()).add(t)
    return {k: sorted(v) for k, v in out.items()}


def documents(cache: str, per_doc: int = 5, groupings: int = 3, seed: int = 0) -> list[tuple[str, str]]:
    """(label, text) documents, each `per_doc` messages of one language joined as sentences; each of
    `groupings` shuffles groups the messages differently, so documents differ while messages recur."""
    rng = random.Random(seed)
    docs = []
    for label, unique in sorted(messages(fetch_wheel(cache)).items()):
        sep = "" if label in ("ja", "zh") else " "
        end = "。" if label in ("ja", "zh") else "."
        for _ in range(groupings):
            msgs = list(unique)
            rng.shuffle(msgs)
            for i in range(0, len(msgs) - per_doc + 1, per_doc):
                docs.append((label, sep.join(m.rstrip(".。") + end for m in msgs[i : i + per_doc])))
    return docs
