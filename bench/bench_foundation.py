"""Foundation figures: ingest throughput (plain runner and through Prefect) and the cached rerun time
of the demo, the issue's "second `make demo` in under 15 s".

    .venv/bin/python bench/bench_foundation.py [--docs 200000]

Builds its corpus from the repo's real text (examples/data, Python module docstrings), repeated with
a varying prefix so that rows differ, as JSONL files of ~10k documents each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_corpus(directory: str, n_docs: int, per_file: int = 10_000) -> int:
    texts = []
    with open(os.path.join(REPO, "examples/data/stdlib_docstrings.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    os.makedirs(directory, exist_ok=True)
    total = 0
    for start in range(0, n_docs, per_file):
        with open(os.path.join(directory, f"part-{start // per_file:04d}.jsonl"), "w") as f:
            for i in range(start, min(start + per_file, n_docs)):
                line = json.dumps(
                    {"id": f"d{i}", "text": f"[{i}] " + texts[i % len(texts)], "url": f"https://example.org/{i}"}
                )
                f.write(line + "\n")
                total += len(line) + 1
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()

    from tasks.artifacts import ArtifactStore
    from tasks.ingest import IngestConfig, IngestStage
    from tasks.stage import run_in_store

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        nbytes = build_corpus(data, args.docs)
        cfg = IngestConfig(paths=[data], unit_files=1)
        t0 = time.perf_counter()
        art = run_in_store(IngestStage(), cfg, [], ArtifactStore(os.path.join(tmp, "store")))
        dt = time.perf_counter() - t0
        print(
            f"ingest (plain runner, 1 process): {art.num_rows:,} docs, {nbytes / 2**20:.1f} MiB JSONL in {dt:.2f} s "
            f"= {art.num_rows / dt:,.0f} docs/s, {nbytes / 2**20 / dt:.1f} MiB/s"
        )

        cfg_path = os.path.join(tmp, "p.yaml")
        with open(cfg_path, "w") as f:
            f.write(f"store:\n  root: {tmp}/flowstore\ningest:\n  paths: [{data}]\n  unit_files: 1\n")
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        kiln = [sys.executable, "-m", "flows.cli", "run", cfg_path]
        for label in ("first", "cached"):
            t0 = time.perf_counter()
            r = subprocess.run(kiln, cwd=REPO, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            assert r.returncode == 0, r.stderr[-2000:]
            print(f"kiln run ({label}, threads x2, {args.docs // 10_000} units): {dt:.1f} s wall")

    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
            cmd = [os.path.join(REPO, ".venv/bin/kiln"), "run", "configs/demo.yaml", "--set", f"store.root={tmp}/store"]
            for label in ("first", "second (cached)"):
                t0 = time.perf_counter()
                r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                assert r.returncode == 0, r.stderr[-2000:]
                print(f"demo {label}: {time.perf_counter() - t0:.1f} s wall")
            t0 = time.perf_counter()
            r = subprocess.run(["make", "demo"], cwd=REPO, env=env, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-2000:]
            print(f"make demo (default store, venv present): {time.perf_counter() - t0:.1f} s wall")


if __name__ == "__main__":
    main()
