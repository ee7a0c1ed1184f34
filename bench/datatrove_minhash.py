"""datatrove's MinHash dedup on a JSONL corpus, for bench/bench_dedup.py. Runs in a SEPARATE venv that has
datatrove (never a Kiln dependency), e.g.

    python3 -m venv /tmp/dt-venv && /tmp/dt-venv/bin/pip install "datatrove[processing,io]" spacy
    /tmp/dt-venv/bin/python bench/datatrove_minhash.py IN_DIR WORK_DIR [--buckets 14 --rows 8 --tasks 1]

Its four stages as in datatrove's examples/minhash_deduplication.py: signatures -> buckets -> clusters ->
filter, each a LocalPipelineExecutor with `workers=1` (so every task runs in this one process, one after
the other, like Kiln's chain). Stages 1 and 4 use `--tasks` tasks; stage 2 uses one task per bucket
(datatrove requires a multiple of the bucket count); stage 3 one task.

Prints one JSON line: seconds per stage and in total, datatrove's version and config, peak RSS of this
process (VmHWM), and writes WORK_DIR/removals.json: [{"id", "kept_id"}] for every removed document,
kept_id being the document of the same cluster that datatrove kept.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("in_dir")
    ap.add_argument("work_dir")
    ap.add_argument("--buckets", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8, help="hashes per bucket")
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=1)
    args = ap.parse_args()

    t_import = time.perf_counter()
    import datatrove
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.typeshelper import Languages

    import_s = time.perf_counter() - t_import
    w = args.work_dir
    cfg = MinhashConfig(
        n_grams=args.ngram,
        num_buckets=args.buckets,
        hashes_per_bucket=args.rows,
        seed=1,
        hash_config=HashConfig(precision=64),
    )

    def reader():
        return JsonlReader(args.in_dir, id_key="id", text_key="text", compression=None, glob_pattern="*.jsonl")

    stages = {
        "signatures": LocalPipelineExecutor(
            [reader(), MinhashDedupSignature(output_folder=f"{w}/sigs", config=cfg, language=Languages.english)],
            tasks=args.tasks,
            workers=1,
            logging_dir=f"{w}/logs/sigs",
        ),
        "buckets": LocalPipelineExecutor(
            [MinhashDedupBuckets(input_folder=f"{w}/sigs", output_folder=f"{w}/buckets", config=cfg)],
            tasks=cfg.num_buckets,
            workers=1,
            logging_dir=f"{w}/logs/buckets",
        ),
        "clusters": LocalPipelineExecutor(
            [
                MinhashDedupCluster(
                    input_folder=f"{w}/buckets", output_folder=f"{w}/remove_ids", config=cfg, save_cluster_id=True
                )
            ],
            tasks=1,
            workers=1,
            logging_dir=f"{w}/logs/clusters",
        ),
        "filter": LocalPipelineExecutor(
            [
                reader(),
                MinhashDedupFilter(
                    input_folder=f"{w}/remove_ids",
                    load_cluster_ids=True,
                    exclusion_writer=JsonlWriter(f"{w}/removed", compression=None),
                ),
                JsonlWriter(f"{w}/output", compression=None),
            ],
            tasks=args.tasks,
            workers=1,
            logging_dir=f"{w}/logs/filter",
        ),
    }
    times = {}
    t0 = time.perf_counter()
    for name, ex in stages.items():
        t = time.perf_counter()
        ex.run()
        times[name] = time.perf_counter() - t
    total = time.perf_counter() - t0
    peak = _hwm_mb()

    def read(folder: str):
        for path in sorted(glob.glob(f"{folder}/*.jsonl")):
            with open(path) as f:
                for line in f:
                    d = json.loads(line)
                    yield d["id"], d.get("metadata", {}).get("minhash_cluster_id", -1)

    kept = {c: i for i, c in read(f"{w}/output") if c != -1}
    removals = [{"id": i, "kept_id": kept.get(c, i)} for i, c in read(f"{w}/removed")]
    with open(os.path.join(w, "removals.json"), "w") as f:
        json.dump(removals, f)
    print(
        json.dumps(
            {
                "seconds": total,
                "stages": times,
                "import_s": import_s,
                "peak_rss_mb": peak,
                "removed": len(removals),
                "version": datatrove.__version__ if hasattr(datatrove, "__version__") else _version(),
                "config": str(cfg),
                "tasks": args.tasks,
                "workers": 1,
            }
        )
    )


def _hwm_mb() -> float:
    """VmHWM: peak RSS of this process image (ru_maxrss would include the forking parent's size)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version() -> str:
    from importlib.metadata import version

    return version("datatrove")


if __name__ == "__main__":
    main()
