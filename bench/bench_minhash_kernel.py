"""The MinHash kernel: rensa (what the minhash stage runs) against datasketch, on the same shingles.

    flock /tmp/kiln-heavy.lock .venv/bin/python bench/bench_minhash_kernel.py --datasketch /tmp/ds-venv/bin/python \
        [--docs 20000] [--pairs 2000] [--num-perm 128]

Both kernels get the same input: each document's word 5-gram shingle hashes (uint64), made once by the
minhash stage's own vectorised shingling (tasks/dedup/hashing.py), so only the signature step is timed.
rensa: `MinHasher.signatures` -- one call for the whole batch (`digest_matrix_from_flat_token_hashes`).
datasketch (in another interpreter's venv, never a Kiln dependency: `python3 -m venv /tmp/ds-venv &&
/tmp/ds-venv/bin/pip install datasketch==2.0 numpy`): one `MinHash(num_perm=128)` per document fed with
`update_batch`, first with its default hash (SHA-1 of each shingle's 8 bytes), then with the shingle hash
itself as the hash (`hashfunc`: no SHA-1 at all, its permutation arithmetic alone). 128 permutations.

Quality: for 2,000 planted pairs (bench/bench_dedup.py's copies, true Jaccard of their word 5-gram sets
from Python sets), the mean absolute error of each kernel's Jaccard estimate (the share of equal signature
slots), over all pairs and over those with a true Jaccard below 0.95, and the share of pairs the estimate
puts on the other side of the 0.8 threshold than the true Jaccard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DATASKETCH = r"""
import json, sys, time
import numpy as np
from datasketch import MinHash
hashes, offsets, out, num_perm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
h = np.load(hashes)
o = np.load(offsets)
docs = [h[o[i]:o[i + 1]] for i in range(len(o) - 1)]
result = {}
for name, kwargs, feed in (
    ("sha1", {}, lambda d: [x.tobytes() for x in d]),
    ("identity", {"hashfunc": lambda x: x & 0xFFFFFFFF}, lambda d: d.tolist()),
):
    fed = [feed(d) for d in docs]  # conversion outside the clock: only the kernel is timed
    t0 = time.perf_counter()
    sigs = []
    for d in fed:
        m = MinHash(num_perm=num_perm, seed=1, **kwargs)
        m.update_batch(d)
        sigs.append(m.hashvalues)
    result[name] = time.perf_counter() - t0
    np.save(out + "." + name + ".npy", np.array(sigs))
import datasketch
result["version"] = datasketch.__version__
print("RESULT " + json.dumps(result))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasketch", required=True, help="a Python interpreter whose venv has datasketch and numpy")
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--pairs", type=int, default=2_000)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--cache", default="/tmp/kiln-bench-cache")
    args = ap.parse_args()

    from importlib.metadata import version

    from bench.bench_dedup import KINDS, jaccard, plant
    from bench.data.english import corpus
    from tasks.dedup.hashing import MinHasher, normalise_for_dedup, shingle_batch

    base = corpus(args.cache, 120_000)[: args.docs]
    rng = random.Random(0)
    vocab = sorted({w for t in base[:2000] for w in t.split() if w.isalpha() and len(w) > 3})
    picked = rng.sample([i for i, t in enumerate(base) if len(t.split()) >= 60], args.pairs)
    copies = [plant(base[i], KINDS[j % len(KINDS)], rng, vocab) for j, i in enumerate(picked)]
    texts = base + copies
    batch = shingle_batch([normalise_for_dedup(t) for t in texts], 5)
    n = len(texts)

    hasher = MinHasher(args.num_perm, seed=1)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sig_rensa = hasher.signatures(batch)
        best = min(best, time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-kernel-") as tmp:
        np.save(os.path.join(tmp, "h.npy"), batch.hashes)
        np.save(os.path.join(tmp, "o.npy"), batch.offsets)
        r = subprocess.run(
            [
                args.datasketch,
                "-c",
                DATASKETCH,
                *(os.path.join(tmp, f) for f in ("h.npy", "o.npy", "sig")),
                str(args.num_perm),
            ],
            capture_output=True,
            text=True,
        )
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode or line is None:
            raise SystemExit(f"datasketch failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        ds = json.loads(line[7:])
        sig_ds = {name: np.load(os.path.join(tmp, f"sig.{name}.npy")) for name in ("sha1", "identity")}

    truth = np.array([jaccard(base[i], c) for i, c in zip(picked, copies)])
    first, second = np.array(picked), np.arange(args.docs, n)

    partial = truth < 0.95  # the pairs an estimate can get wrong (identical shingle sets give 1.0 in any kernel)

    def error(sig: np.ndarray) -> tuple[float, float, float]:
        """(mean |error| over all pairs, over the partial ones, share of pairs on the wrong side of 0.8)."""
        est = (sig[first] == sig[second]).mean(axis=1)
        err = np.abs(est - truth)
        return float(err.mean()), float(err[partial].mean()), float(((est >= 0.8) != (truth >= 0.8)).mean())

    shingles = int(batch.hashes.size)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{n:,} documents, {shingles:,} shingles ({shingles / n:.0f} a document), {args.num_perm} permutations; "
        f"rensa {version('rensa')}, datasketch {ds['version']}"
    )
    rows = [
        ("rensa (the minhash stage), one call a batch", best, error(sig_rensa)),
        ("datasketch, MinHash per document, SHA-1 (its default)", ds["sha1"], error(sig_ds["sha1"])),
        ("datasketch, MinHash per document, no hashing (hashfunc)", ds["identity"], error(sig_ds["identity"])),
    ]
    print(
        f"\n{'kernel':<60}{'seconds':>9}{'us/doc':>9}{'docs/s':>10}{'x rensa':>9}"
        f"{'|err| all':>11}{'|err| J<.95':>13}{'wrong @0.8':>12}"
    )
    for name, secs, (err, err_partial, wrong) in rows:
        print(
            f"{name:<60}{secs:>9.2f}{secs / n * 1e6:>9.1f}{n / secs:>10,.0f}{secs / best:>9.1f}"
            f"{err:>11.4f}{err_partial:>13.4f}{wrong:>12.2%}"
        )
    print(
        f"\n{args.pairs} planted pairs, true Jaccard (5-gram word sets): mean {truth.mean():.3f}, "
        f"min {truth.min():.3f}; {int(partial.sum())} below 0.95; sampling error of {args.num_perm} slots "
        f"at J = 0.8: +-{np.sqrt(0.8 * 0.2 / args.num_perm):.3f}"
    )


if __name__ == "__main__":
    main()
