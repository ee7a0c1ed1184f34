"""Throughput of this tree against another commit, in the same run: dedup, langid, tokenize + pack, CPU
training, and clean / langid on one big file with one unit against the units spread over both cores.

    .venv/bin/python bench/bench_compare.py --baseline 44dfff8 [--docs 20000] [--repeats 2]

The baseline is checked out into a temporary git worktree; every measurement runs in a fresh process
whose imports come from one tree or the other (same venv, same data, same machine, interleaved), and
the best of `--repeats` runs is kept. The one-big-file figures use `kiln stage --workers 1` and
`--workers 2` of this tree (the baseline's `kiln stage` runs its units in one process).
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

MEASURE = r"""
import json, os, sys, time
root, what, data, work = sys.argv[1:5]
sys.path.insert(0, root)
os.chdir(root)
from tasks.artifacts import ArtifactStore
from tasks.stage import run_in_store
from tasks.ingest import IngestConfig, IngestStage

store = ArtifactStore(os.path.join(work, "store"), shard_rows=5000)
docs = run_in_store(IngestStage(), IngestConfig(paths=[data]), [], store)
n = docs.num_rows
t0 = time.perf_counter()
if what == "dedup":
    from tasks.dedup import DedupConfig, DedupStage, run_dedup_chain
    cfg = DedupConfig()
    clusters = run_dedup_chain([docs], cfg, store)
    run_in_store(DedupStage(), cfg, [docs, clusters], store)
    out = {"docs_per_s": n / (time.perf_counter() - t0)}
elif what == "langid":
    from tasks.langid import LangIdConfig, LangIdStage
    run_in_store(LangIdStage(), LangIdConfig(), [docs], store)
    out = {"docs_per_s": n / (time.perf_counter() - t0)}
elif what == "tokenize_pack":
    from tasks.pack import PackConfig, PackStage
    from tasks.tokenize import TokenizeConfig, TokenizerConfig, TokenizerStage, TokenizeStage
    tok = run_in_store(TokenizerStage(), TokenizerConfig(vocab_size=8000, max_train_chars=4_000_000), [docs], store)
    t0 = time.perf_counter()
    toks = run_in_store(TokenizeStage(), TokenizeConfig(), [docs, tok], store)
    run_in_store(PackStage(), PackConfig(seq_len=2048), [toks], store)
    out = {"tokens_per_s": toks.manifest["tokens"]["tokens"] / (time.perf_counter() - t0)}
elif what == "train":
    from tasks.pack import PackConfig, PackStage
    from tasks.tokenize import TokenizeConfig, TokenizerConfig, TokenizerStage, TokenizeStage
    from tasks.train.config import TrainConfig
    from tasks.train.stage import TrainStage
    tok = run_in_store(TokenizerStage(), TokenizerConfig(vocab_size=2048, max_train_chars=2_000_000), [docs], store)
    pack = run_in_store(PackStage(), PackConfig(seq_len=128, validation_fraction=0.05),
                        [run_in_store(TokenizeStage(), TokenizeConfig(), [docs, tok], store)], store)
    cfg = TrainConfig.model_validate({
        "model": {"init": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 4}},
        "deepspeed": {"zero_stage": 2}, "seq_len": 128, "max_steps": 100, "micro_batch_size": 8, "eval_every": 100,
        "eval_batches": 4, "save_every": 100, "log_every": 10, "optim": {"lr": 0.002, "warmup_steps": 6}})
    t0 = time.perf_counter()
    art = run_in_store(TrainStage(), cfg, [pack, tok], store)
    hist = json.load(open(os.path.join(art.path, "metrics.json")))["history"]
    rates = [h["tokens_per_s"] for h in hist if h["kind"] == "train"][1:]  # the first window holds the warm-up
    out = {"tokens_per_s": sorted(rates)[len(rates) // 2], "stage_seconds": time.perf_counter() - t0}
print("RESULT " + json.dumps(out))
"""


def write_corpus(path: str, n: int) -> None:
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from data.english import corpus  # noqa: PLC0415

    texts = corpus(os.path.join(REPO, ".kiln", "bench-cache"), n)
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")


def measure(root: str, what: str, data: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-cmp-") as work:
        r = subprocess.run(
            [sys.executable, "-c", MEASURE, root, what, data, work],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": root},
        )
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode or line is None:
            raise RuntimeError(f"{what} in {root} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return json.loads(line[7:])


def stage_wall(stage: str, data: str, workers: int, extra: list[str]) -> tuple[float, float, float]:
    """(the stage's own wall seconds, the whole command's wall seconds, CPU seconds of the command and its
    children) of `kiln stage STAGE` on one file. The command also starts Python and reads the loose file
    into documents (one unit) before the stage runs."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-stage-") as out:
        before = os.times()
        t0 = time.perf_counter()
        subprocess.run(
            [
                os.path.join(REPO, ".venv", "bin", "kiln"),
                "stage",
                stage,
                "-i",
                data,
                "-o",
                os.path.join(out, "o"),
                "--workers",
                str(workers),
                *extra,
            ],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - t0
        after = os.times()
        with open(os.path.join(out, "o", "_manifest.json")) as f:
            stage_seconds = json.load(f)["wall_seconds"]
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        return stage_seconds, wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", default="44dfff8", help="the commit to compare with")
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--big-docs", type=int, default=23_600, help="documents in the one big file")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=["dedup", "langid", "tokenize_pack", "train", "one_file"])
    args = ap.parse_args()
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}; this tree at {head} (plus uncommitted changes), "
        f"baseline {args.baseline}"
    )
    with (
        tempfile.TemporaryDirectory(prefix="kiln-bench-base-") as base_tree,
        tempfile.TemporaryDirectory(prefix="kiln-bench-data-") as tmp,
    ):
        subprocess.run(["git", "worktree", "add", "--detach", "-q", base_tree, args.baseline], cwd=REPO, check=True)
        try:
            data = os.path.join(tmp, "docs.jsonl")
            write_corpus(data, args.docs)
            trees = {"baseline": base_tree, "this tree": REPO}
            for what in [w for w in args.only if w != "one_file"]:
                best: dict[str, dict] = {}
                for _ in range(args.repeats):
                    for name, root in trees.items():  # interleaved, so load drifts hit both alike
                        r = measure(root, what, data)
                        key = next(iter(r))
                        if name not in best or r[key] > best[name][key]:
                            best[name] = r
                key = next(iter(best["this tree"]))
                b, t = best["baseline"][key], best["this tree"][key]
                print(f"{what:14s} {key}: baseline {b:,.0f}, this tree {t:,.0f} ({t / b:.2f}x)")
            if "one_file" in args.only:
                big = os.path.join(tmp, "big.jsonl")
                write_corpus(big, args.big_docs)
                for stage, extra in (("clean", ["--set", "c4.enabled=false"]), ("langid", [])):
                    runs = {w: min(stage_wall(stage, big, w, extra) for _ in range(args.repeats)) for w in (1, 2)}
                    (s1, w1, c1), (s2, w2, c2) = runs[1], runs[2]
                    print(
                        f"kiln stage {stage} on one {args.big_docs:,}-document file: the stage {s1:.2f} s with 1 "
                        f"worker, {s2:.2f} s with 2 = {s2 / s1:.2f}x (target <= 0.6); the whole command {w1:.1f} s "
                        f"({c1:.1f} s CPU) vs {w2:.1f} s ({c2:.1f} s CPU)"
                    )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=REPO)


if __name__ == "__main__":
    main()
