"""Near-duplicate dedup quality, speed and memory on real text with planted copies of known Jaccard.

    .venv/bin/python bench/bench_dedup.py [--docs 20000] [--scales 1,2.3] [--cache /tmp/kiln-bench-cache]
        [--datatrove /tmp/dt-venv/bin/python [--dt-buckets 14 --dt-rows 8]]

Corpus: distinct docstrings of the standard library and installed packages (bench/data/english.py);
1 in 10 documents gets a planted copy: whitespace/case change, word edits at several rates,
paragraph reordering, added boilerplate. The true Jaccard of every planted pair (word 5-gram sets,
computed here with Python sets, independently of the stage's hashing) decides what must be caught.
Past ~47k distinct docstrings (scale 2.3 of 20k) the corpus goes on with the docstrings of pinned wheels
that are downloaded, not installed (bench/data/english.py EXTRA_WHEELS), so 4x (80k) is real text too.

Ingest runs in one child process; the chain (minhash -> dedup_candidates -> dedup_clusters -> dedup)
then runs in a fresh child that finds the ingest artifact committed in the store, so its peak RSS
(VmHWM, and the sampled RSS of the process tree) is the chain's own, not the ingest's.

--datatrove PYTHON runs datatrove's MinHash dedup (bench/datatrove_minhash.py) on the same documents,
written as one JSONL file, in that other interpreter's venv (datatrove is never a Kiln dependency), in
one process (LocalPipelineExecutor workers=1) like Kiln's chain, and scores it against the same truth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tasks.dedup.hashing import normalise_for_dedup  # noqa: E402

BOILERPLATE = "\n\nShare this article. Subscribe to our newsletter for more updates. All rights reserved."


def grams(text: str, n: int = 5) -> set:
    w = normalise_for_dedup(text).split()
    return {tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}


def jaccard(a: str, b: str) -> float:
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb) if ga | gb else 1.0


def plant(text: str, kind: str, rng: random.Random, vocab: list[str]) -> str:
    if kind == "ws_case":
        return "  ".join(text.upper().split(" ")).replace("\n", "\n\n")
    if kind == "reorder":
        paras = text.split("\n\n")
        if len(paras) > 1:
            return "\n\n".join(paras[1:] + paras[:1])
        lines = text.split("\n")
        return "\n".join(lines[len(lines) // 2 :] + lines[: len(lines) // 2])
    if kind == "boilerplate":
        return text + BOILERPLATE
    every = int(kind.split("_")[1])  # edit_N: replace one word in N
    words = text.split(" ")
    for i in range(rng.randrange(every), len(words), every):
        words[i] = rng.choice(vocab)
    return " ".join(words)


KINDS = [
    "ws_case",
    "reorder",
    "boilerplate",
    "edit_200",
    "edit_100",
    "edit_60",
    "edit_40",
    "edit_30",
    "edit_20",
    "edit_12",
    "edit_8",
]


def build(cache: str, n_docs: int, out_dir: str, seed: int = 0) -> dict:
    from bench.data.english import corpus

    base = corpus(cache, 120_000)
    n_orig = int(n_docs / 1.1)
    if n_orig > len(base):  # the same first documents, then the docstrings of the extra wheels
        base = corpus(cache, 120_000, extra=True)
    if n_orig > len(base):
        raise SystemExit(f"only {len(base)} distinct documents available; ask for at most {int(len(base) * 1.1)}")
    rng = random.Random(seed)
    originals = base[:n_orig]
    vocab = sorted({w for t in originals[:2000] for w in t.split() if w.isalpha() and len(w) > 3})
    docs = [(f"d{i:06d}", t) for i, t in enumerate(originals)]
    pairs = []
    eligible = [i for i, t in enumerate(originals) if len(t.split()) >= 60]
    for j, i in enumerate(rng.sample(eligible, min(len(eligible), n_docs - n_orig))):
        kind = KINDS[j % len(KINDS)]
        copy = plant(originals[i], kind, rng, vocab)
        cid = f"c{j:06d}"
        pairs.append({"orig": f"d{i:06d}", "copy": cid, "kind": kind, "jaccard": jaccard(originals[i], copy)})
        docs.append((cid, copy))
    rng.shuffle(docs)  # copies are not always after their original
    os.makedirs(out_dir, exist_ok=True)
    per_file = 2500
    for k in range(0, len(docs), per_file):
        part = docs[k : k + per_file]
        pq.write_table(
            pa.table({"id": [d[0] for d in part], "text": [d[1] for d in part]}),
            os.path.join(out_dir, f"docs-{k // per_file:04d}.parquet"),
        )
    jsonl = os.path.join(os.path.dirname(out_dir), "jsonl")
    os.makedirs(jsonl, exist_ok=True)
    with open(os.path.join(jsonl, "docs.jsonl"), "w") as f:  # same documents, same order, for datatrove
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return {"docs": len(docs), "pairs": pairs, "texts": dict(docs), "jsonl": jsonl}


def measure(cmd: list[str]) -> tuple[str, float, float]:
    """Run cmd; (stdout, wall seconds, peak summed RSS in MB of its process tree, sampled every 50 ms)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                rss = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                return
            done.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{err[-4000:]}")
    return out, wall, peak[0] / 2**20


def hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM). Unlike ru_maxrss, it starts afresh at exec, so a child does not
    inherit the size of the bench process that forked it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ingest(in_dir: str, store_dir: str):
    from tasks.artifacts import ArtifactStore
    from tasks.ingest import IngestConfig, IngestStage
    from tasks.stage import run_in_store

    store = ArtifactStore(store_dir)
    return store, run_in_store(IngestStage(), IngestConfig(paths=[in_dir], unit_files=1), [], store)


def run_ingest(in_dir: str, store_dir: str) -> None:
    """Child process: ingest only, committed in the store for the chain's process."""
    _ingest(in_dir, store_dir)


def run_chain(in_dir: str, store_dir: str) -> None:
    """Child process: open the committed ingest (run_ingest ran it), then the dedup chain; prints a JSON line."""
    from tasks.dedup import DedupCandidatesStage, DedupClustersStage, DedupConfig, DedupStage, MinHashStage
    from tasks.stage import run_in_store

    t = time.perf_counter()
    store, docs = _ingest(in_dir, store_dir)
    open_s = time.perf_counter() - t
    rss_before = hwm_mb()
    cfg = DedupConfig()
    times = {}
    t0 = time.perf_counter()
    mh = run_in_store(MinHashStage(), cfg, [docs], store)
    times["minhash"] = time.perf_counter() - t0
    t = time.perf_counter()
    cands = run_in_store(DedupCandidatesStage(), cfg, [mh], store)
    times["dedup_candidates"] = time.perf_counter() - t
    t = time.perf_counter()
    clusters = run_in_store(DedupClustersStage(), cfg, [cands, docs], store)
    times["dedup_clusters"] = time.perf_counter() - t
    t = time.perf_counter()
    out = run_in_store(DedupStage(), cfg, [docs, clusters], store)
    times["dedup"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": total,
                "stages": times,
                "rows_in": out.stats.rows_in,
                "out": out.path,
                "clusters": clusters.path,
                "peak_rss_mb": hwm_mb(),
                "rss_after_ingest_mb": rss_before,
                "ingest_open_s": open_s,
                "lsh": mh.manifest.get("lsh"),
                "cluster_stats": clusters.stats.to_dict(),
            }
        )
    )


def kiln_removals(result: dict) -> list[dict]:
    from tasks.artifacts import Artifact

    return Artifact.open(result["clusters"]).read_table(columns=["id", "kept_id", "reason"]).to_pylist()


def evaluate(built: dict, removals: list[dict]) -> dict:
    rep = {r["id"]: r["kept_id"] for r in removals}
    texts = built["texts"]
    pairs = built["pairs"]
    must = [p for p in pairs if p["jaccard"] >= 0.8]
    caught = [p for p in must if rep.get(p["orig"], p["orig"]) == rep.get(p["copy"], p["copy"])]
    ws = [p for p in pairs if p["kind"] == "ws_case"]
    ws_caught = [p for p in ws if rep.get(p["orig"], p["orig"]) == rep.get(p["copy"], p["copy"])]
    low = [p for p in pairs if p["jaccard"] < 0.7]
    low_merged = [p for p in low if rep.get(p["orig"], p["orig"]) == rep.get(p["copy"], p["copy"])]
    true_j = [jaccard(texts[r["id"]], texts[r["kept_id"]]) for r in removals]
    by_kind: dict[str, list] = {}
    for p in pairs:
        by_kind.setdefault(p["kind"], []).append(p)
    return {
        "removed": len(removals),
        "planted_pairs": len(pairs),
        "pairs_jaccard_ge_0.8": len(must),
        "recall_ge_0.8": len(caught) / max(1, len(must)),
        "precision (removed with true J >= 0.8 to the kept doc)": sum(j >= 0.8 for j in true_j) / max(1, len(true_j)),
        "removals with true J < 0.7 to the kept doc": sum(j < 0.7 for j in true_j) / max(1, len(true_j)),
        "planted pairs with J < 0.7 wrongly merged": f"{len(low_merged)}/{len(low)}",
        "whitespace/case copies caught": f"{len(ws_caught)}/{len(ws)}",
        "removed outside planted pairs (natural duplicates in the source)": sum(
            1 for r in removals if not r["id"].startswith("c")
        ),
        "mean J by kind": {k: round(sum(p["jaccard"] for p in v) / len(v), 3) for k, v in sorted(by_kind.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--scales", default="1,2.3")
    ap.add_argument("--cache", default="/tmp/kiln-bench-cache")
    ap.add_argument(
        "--datatrove",
        metavar="PYTHON",
        help="interpreter of a venv with datatrove[processing,io] "
        "and spacy: also run datatrove's MinHash dedup on the same corpus",
    )
    ap.add_argument("--dt-buckets", type=int, default=14, help="datatrove num_buckets (its default 14)")
    ap.add_argument("--dt-rows", type=int, default=8, help="datatrove hashes_per_bucket (its default 8)")
    ap.add_argument("--dt-tasks", type=int, default=1, help="datatrove tasks of stages 1 and 4 (workers=1)")
    ap.add_argument("--run-chain", nargs=2, metavar=("IN_DIR", "STORE"))
    ap.add_argument("--run-ingest", nargs=2, metavar=("IN_DIR", "STORE"))
    args = ap.parse_args()
    if args.run_ingest:
        return run_ingest(*args.run_ingest)
    if args.run_chain:
        return run_chain(*args.run_chain)
    for scale in [float(s) for s in args.scales.split(",")]:
        work = tempfile.mkdtemp(prefix="kiln-bench-dedup-")
        try:
            n = int(args.docs * scale)
            built = build(args.cache, n, os.path.join(work, "in"))
            in_dir, store = os.path.join(work, "in"), os.path.join(work, "store")
            subprocess.run(
                [sys.executable, __file__, "--run-ingest", in_dir, store], capture_output=True, text=True, check=True
            )
            out, wall, tree_mb = measure([sys.executable, __file__, "--run-chain", in_dir, store])
            result = json.loads(out.strip().splitlines()[-1])
            print(f"\n== scale {scale}: {built['docs']:,} documents ==")
            kiln_rate = built["docs"] / result["seconds"]
            print(
                f"kiln chain: {result['seconds']:.1f} s = {kiln_rate:,.0f} docs/s "
                f"(one process), stages {{{', '.join(f'{k}: {v:.1f}' for k, v in result['stages'].items())}}}; "
                f"process wall {wall:.1f} s (imports, opening the committed ingest {result['ingest_open_s']:.1f} s)"
            )
            print(
                f"kiln chain peak RSS {result['peak_rss_mb']:.0f} MB VmHWM, {tree_mb:.0f} MB sampled "
                f"(after opening ingest {result['rss_after_ingest_mb']:.0f} MB); LSH {result['lsh']}"
            )
            print("clusters stage:", json.dumps(result["cluster_stats"]["extra"]), result["cluster_stats"]["rejected"])
            for k, v in evaluate(built, kiln_removals(result)).items():
                print(f"  {k}: {v if not isinstance(v, float) else round(v, 4)}")
            if args.datatrove:
                dt_work = os.path.join(work, "datatrove")
                script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datatrove_minhash.py")
                out, dt_wall, dt_tree_mb = measure(
                    [
                        args.datatrove,
                        script,
                        built["jsonl"],
                        dt_work,
                        "--buckets",
                        str(args.dt_buckets),
                        "--rows",
                        str(args.dt_rows),
                        "--tasks",
                        str(args.dt_tasks),
                    ]
                )
                dt = json.loads(out.strip().splitlines()[-1])
                dt_rate = built["docs"] / dt["seconds"]
                print(
                    f"datatrove {dt['version']} ({dt['config']}, tasks={dt['tasks']}, workers=1): "
                    f"{dt['seconds']:.1f} s = {dt_rate:,.0f} docs/s, stages "
                    f"{{{', '.join(f'{k}: {v:.1f}' for k, v in dt['stages'].items())}}}; process wall {dt_wall:.1f} s"
                )
                print(f"datatrove peak RSS {dt['peak_rss_mb']:.0f} MB VmHWM, {dt_tree_mb:.0f} MB sampled")
                print(f"kiln / datatrove docs/s: {kiln_rate / dt_rate:.2f}x; process wall {dt_wall / wall:.2f}x")
                with open(os.path.join(dt_work, "removals.json")) as f:
                    dt_removals = json.load(f)
                for k, v in evaluate(built, dt_removals).items():
                    print(f"  datatrove {k}: {v if not isinstance(v, float) else round(v, 4)}")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
