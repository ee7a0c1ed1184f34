"""A scheduled run on a grown corpus: what the second night costs against the first, with `kiln run`.

    flock /tmp/kiln-heavy.lock .venv/bin/python bench/bench_incremental.py [--docs 50000] [--growth 0.05]
        [--shard-rows 20000] [--unit-mb 2] [--pack-unit-mb 1] [--hf-dataset] [--runner threads]
        [--cache /tmp/kiln-bench-cache] [--keep DIR]

Night 1: `--docs` documents -- distinct docstrings of the standard library and the installed packages
(bench/data/english.py), one in ten with a planted copy (bench/bench_dedup.py's kinds: case and spacing,
word edits, reordered paragraphs, boilerplate) -- as JSONL files of 2,500 documents. Night 2 adds one file
of `--growth` x that many documents: new docstrings, copies of night-1 documents and copies among
themselves. The pipeline is the data flow up to packed rows: ingest -> clean -> dedup (minhash,
dedup_candidates, dedup_clusters, dedup) -> langid -> tokenize (with a tokenizer trained once, beforehand,
as a schedule pins it) -> pack, run with `kiln run` (its embedded Prefect API, the default thread runner).
Settings a schedule wants: `store.shard_rows: 20000` (source shards of ~2,500 documents: what a rerun
copies or redoes), `ingest.unit_mb: 2` (each nightly file a unit of its own: a new file does not make an
old group of files be read again) and `pack.unit_mb: 1` (token shards packed in groups of ~1 MiB, so the
new shards make a new group). `pack.hf_dataset` is off unless `--hf-dataset`: the Hugging Face copy is
rewritten whole at every commit.

Three runs, one after the other in one invocation: night 1 into an empty store, night 2 into the same
store, and night 2 into an empty store (from scratch, the reference: its artifacts must be the ones the
second run made, fingerprints and rows). Printed per run and stage: the stage's wall seconds (manifest
`wall_seconds`: planning, the copies, the units fanned out through Prefect -- not the commit), the seconds
from the previous stage's commit to this one's (the manifest's mtime: commit and Prefect's hand-over
included), the units and how many were copied from earlier artifacts. The figures the target is about
(night 2 <= 15 % of night 1) are the data stages' totals in both columns; the flow's time as `kiln run`
prints it (its embedded server's start included) and the whole command's (Python, imports) are printed
beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STAGES = ("ingest", "clean", "minhash", "dedup_candidates", "dedup_clusters", "dedup", "langid", "tokenize", "pack")
PER_FILE = 2_500


def build(cache: str, docs: int, growth: float, out: str, seed: int = 0) -> tuple[list[list[dict]], list[dict]]:
    """(night 1's files, night 2's file) of {"id", "text"} records."""
    from bench.bench_dedup import KINDS, plant
    from bench.data.english import corpus

    base = corpus(cache, 120_000)
    rng = random.Random(seed)
    n1_orig = round(docs / 1.1)
    n2 = round(docs * growth)
    n2_orig = min(len(base) - n1_orig, n2 // 2)
    if n2_orig < n2 // 4:
        raise SystemExit(f"only {len(base)} distinct documents available: ask for fewer --docs")
    vocab = sorted({w for t in base[:2000] for w in t.split() if w.isalpha() and len(w) > 3})
    eligible = [i for i in range(n1_orig) if len(base[i].split()) >= 60]

    def copies(sources: list[tuple[str, str]], n: int, prefix: str) -> list[dict]:
        picked = rng.sample(sources, n)
        return [
            {"id": f"{prefix}{j:06d}", "text": plant(text, KINDS[j % len(KINDS)], rng, vocab)}
            for j, (_, text) in enumerate(picked)
        ]

    night1 = [{"id": f"d{i:06d}", "text": base[i]} for i in range(n1_orig)]
    night1 += copies([(f"d{i:06d}", base[i]) for i in eligible], docs - n1_orig, "c")
    rng.shuffle(night1)  # copies are not always after their original
    fresh = [{"id": f"n{i:06d}", "text": base[n1_orig + i]} for i in range(n2_orig)]
    night2 = fresh + copies([(f"d{i:06d}", base[i]) for i in eligible], (n2 - n2_orig) // 2, "m")
    night2 += copies([(d["id"], d["text"]) for d in fresh if len(d["text"].split()) >= 60], n2 - len(night2), "k")
    rng.shuffle(night2)
    return [night1[k : k + PER_FILE] for k in range(0, len(night1), PER_FILE)], night2


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def config_yaml(path: str, store: str, corpus: str, tokenizer: str, args: argparse.Namespace) -> str:
    with open(path, "w") as f:
        f.write(
            f"name: nightly\nstore:\n  root: {store}\n  shard_rows: {args.shard_rows}\n"
            f"runtime:\n  task_runner: {args.runner}\n  workers: 2\n"
            f"ingest:\n  paths: [{corpus}]\n  unit_mb: {args.unit_mb}\n"
            "clean: {}\ndedup: {}\nlangid: {}\n"
            f"tokenize:\n  tokenizer: {tokenizer}\n"
            f"pack:\n  seq_len: 512\n  unit_mb: {args.pack_unit_mb}\n  hf_dataset: {str(args.hf_dataset).lower()}\n"
        )
    return path


def kiln_run(cfg: str) -> tuple[float, float]:
    """(the whole command's seconds, the flow's seconds as `kiln run` prints them: embedded server included)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["COLUMNS"] = "200"  # the summary table on one line
    t0 = time.perf_counter()
    r = subprocess.run(
        [os.path.join(REPO, ".venv", "bin", "kiln"), "run", cfg], capture_output=True, text=True, env=env, cwd=REPO
    )
    if r.returncode:
        raise SystemExit(f"kiln run {cfg} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    command = time.perf_counter() - t0
    flow = re.search(r"stage\(s\) in ([0-9.]+) s", r.stdout)
    return command, float(flow.group(1)) if flow else float("nan")


def stage_artifacts(cfg: str) -> dict:
    from flows.cli import _load
    from flows.plan import plan_pipeline
    from tasks.artifacts import Artifact

    return {p.name: Artifact.open(p.path) for p in plan_pipeline(_load(cfg)) if p.name in STAGES}


def committed_at(a) -> float:
    """When the artifact's manifest was written: the end of its commit (the manifest is written last)."""
    return os.stat(os.path.join(a.path, "_manifest.json")).st_mtime


def report(title: str, arts: dict, times: tuple[float, float]) -> tuple[float, float]:
    """(sum of the stages' wall seconds, seconds from the first stage's start to the last one's commit)."""
    total = 0.0
    print(f"\n{title}: kiln run {times[0]:.1f} s the whole command, {times[1]:.1f} s the flow")
    print(f"  {'stage':<18}{'wall s':>8}{'+commit':>9}{'units':>7}{'copied':>8}  rows in")
    start = committed_at(arts[STAGES[0]]) - arts[STAGES[0]].manifest.get("wall_seconds", 0.0)
    before = start
    for name in STAGES:
        a = arts[name]
        wall = a.manifest.get("wall_seconds", 0.0)
        total += wall
        end = committed_at(a)
        r = a.reuse()
        note = " (continued the judgement of an earlier run)" if r.get("continued_from") else ""
        print(f"  {name:<18}{wall:>8.2f}{end - before:>9.2f}{r['units']:>7}{r['copied']:>8}  {a.stats.rows_in:,}{note}")
        before = end
    span = before - start
    print(f"  {'data stages':<18}{total:>8.2f}{span:>9.2f}")
    return total, span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50_000, help="night 1's documents")
    ap.add_argument("--growth", type=float, default=0.05, help="night 2's new documents, as a share of night 1's")
    ap.add_argument("--shard-rows", type=int, default=20_000, help="store.shard_rows (source shards ~1/8 of it)")
    ap.add_argument(
        "--unit-mb", type=int, default=2, help="ingest.unit_mb: a nightly file (~2.7 MB here) is a unit of its own"
    )
    ap.add_argument("--pack-unit-mb", type=int, default=1, help="pack.unit_mb: token shards packed together")
    ap.add_argument(
        "--hf-dataset",
        action="store_true",
        help="pack.hf_dataset: also write the Hugging Face copy (of all rows, every run)",
    )
    ap.add_argument("--runner", default="threads", choices=["threads", "processes"], help="runtime.task_runner")
    ap.add_argument("--cache", default="/tmp/kiln-bench-cache")
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()

    work = args.keep or tempfile.mkdtemp(prefix="kiln-bench-incr-")
    os.makedirs(work, exist_ok=True)
    try:
        night1, night2 = build(args.cache, args.docs, args.growth, work)
        corpus = os.path.join(work, "corpus")
        os.makedirs(corpus, exist_ok=True)
        for k, part in enumerate(night1):
            write_jsonl(os.path.join(corpus, f"night1-{k:03d}.jsonl"), part)

        # the tokenizer a schedule pins: trained once on a sample of the first night
        from tasks.artifacts import ArtifactStore
        from tasks.ingest import IngestConfig, IngestStage
        from tasks.stage import run_in_store
        from tasks.tokenize import TokenizerConfig, TokenizerStage

        side = ArtifactStore(os.path.join(work, "tokenizer-store"))
        sample = run_in_store(IngestStage(), IngestConfig(paths=[os.path.join(corpus, "night1-000.jsonl")]), [], side)
        tokenizer = run_in_store(TokenizerStage(), TokenizerConfig(vocab_size=8000), [sample], side).path

        grown = config_yaml(os.path.join(work, "grown.yaml"), os.path.join(work, "store"), corpus, tokenizer, args)
        n1 = sum(len(p) for p in night1)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"night 1: {n1:,} documents in {len(night1)} files; night 2: +{len(night2):,} documents "
            f"({len(night2) / n1:.1%}) in one file; store.shard_rows {args.shard_rows}, ingest.unit_mb {args.unit_mb}, "
            f"pack.unit_mb {args.pack_unit_mb}, pack.hf_dataset {args.hf_dataset}, runner {args.runner}"
        )
        t1 = kiln_run(grown)
        first = stage_artifacts(grown)
        write_jsonl(os.path.join(corpus, "night2-000.jsonl"), night2)
        t2 = kiln_run(grown)
        second = stage_artifacts(grown)
        scratch_cfg = config_yaml(
            os.path.join(work, "scratch.yaml"), os.path.join(work, "scratch-store"), corpus, tokenizer, args
        )
        t3 = kiln_run(scratch_cfg)
        scratch = stage_artifacts(scratch_cfg)

        s1, w1 = report("night 1, empty store", first, t1)
        s2, w2 = report("night 2, the same store", second, t2)
        s3, w3 = report("night 2 from scratch, empty store (reference)", scratch, t3)
        same_fp = all(second[n].fingerprint == scratch[n].fingerprint for n in STAGES)
        same_rows = all(second[n].read_table().equals(scratch[n].read_table()) for n in STAGES)
        kept = set(first["dedup"].read_table(columns=["id"]).column("id").to_pylist())
        still = set(second["dedup"].read_table(columns=["id"]).column("id").to_pylist())
        print("\nnight 2 / night 1 (target <= 15 %):")
        for label, a, b in (
            ("data stages, sum of the stages' wall seconds", s2, s1),
            ("data stages, first start to last commit", w2, w1),
            ("the flow (kiln run's own figure)", t2[1], t1[1]),
            ("the whole kiln run command", t2[0], t1[0]),
        ):
            print(f"  {label + ':':<48}{a:6.2f} s / {b:6.2f} s = {a / b:6.1%}")
        print(f"  night 2 from scratch: {s3:.2f} s (sum), {w3:.2f} s (start to last commit)")
        print(
            f"night 2's artifacts equal the from-scratch ones: fingerprints {same_fp}, rows {same_rows}; "
            f"night-1 documents kept and then removed: {len(kept - still)}; night-2 documents removed as copies: "
            f"{second['dedup'].stats.rows_rejected - first['dedup'].stats.rows_rejected}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
