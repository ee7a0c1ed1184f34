"""Vectorised text hashing for deduplication: normalised words -> word n-gram shingles -> MinHash.

Everything runs on whole batches of documents at once in numpy (and rensa's Rust MinHash kernel):
a Python loop per word or per shingle would cost more than the rest of the pipeline together.

Normalisation is what makes a copy look like a copy: lower case, and every run of characters that
are not letters or digits (punctuation, whitespace, underscores) becomes one separator. So case,
spacing and punctuation changes never hide a duplicate.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_NON_WORD = re.compile(r"[\W_]+")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_BYTE_BASE = np.uint64(0x100000001B3)  # odd, so its powers are invertible modulo 2**64
_WORD_BASE = np.uint64(0x9E3779B97F4A7C15)
_BAND_BASE = np.uint64(0xC2B2AE3D27D4EB4F)


def normalise_for_dedup(text: str) -> str:
    """Lower-cased words separated by single spaces, no punctuation, no leading/trailing space."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def exact_hash(normalised: str) -> int:
    """64-bit hash of the normalised text, as a signed int64 for Arrow."""
    return int.from_bytes(hashlib.blake2b(normalised.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output (x is uint64, wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_POW_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BYTE_BASE**i and its inverse**i modulo 2**64 for i < n (grown and cached)."""
    size = 1 << max(16, math.ceil(math.log2(max(n, 1))))
    cached = _POW_CACHE.get(size)
    if cached is None:
        inv = pow(int(_BYTE_BASE), -1, 1 << 64)
        with np.errstate(over="ignore"):
            pw = np.full(size, _BYTE_BASE, dtype=np.uint64)
            pw[0] = 1
            pw = np.cumprod(pw, dtype=np.uint64)
            ipw = np.full(size, np.uint64(inv), dtype=np.uint64)
            ipw[0] = 1
            ipw = np.cumprod(ipw, dtype=np.uint64)
        _POW_CACHE.clear()
        _POW_CACHE[size] = cached = (pw, ipw)
    return cached


@dataclass
class ShingleBatch:
    """Shingle hashes of a batch of documents, concatenated: doc i owns hashes[offsets[i]:offsets[i+1]]."""

    hashes: np.ndarray  # uint64
    offsets: np.ndarray  # int64, len = docs + 1
    words: np.ndarray  # int64 word count per document


def shingle_batch(normalised: Sequence[str], ngram: int) -> ShingleBatch:
    """Word n-gram shingle hashes for already-normalised texts (see normalise_for_dedup).

    A document shorter than `ngram` words gets one shingle of all its words; an empty one gets none.
    """
    n_docs = len(normalised)
    joined = " ".join(normalised).encode("utf-8")
    buf = np.frombuffer(joined, dtype=np.uint8)
    if buf.size == 0:
        return ShingleBatch(np.zeros(0, np.uint64), np.zeros(n_docs + 1, np.int64), np.zeros(n_docs, np.int64))
    is_sep = buf == 32
    # Document boundaries in the joined buffer: doc i starts at byte starts[i].
    lengths = np.fromiter((len(s.encode("utf-8")) if not s.isascii() else len(s) for s in normalised), np.int64, n_docs)
    doc_starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    # Word starts/ends: a word byte whose predecessor is a separator (or the buffer start).
    word = ~is_sep
    prev = np.concatenate(([False], word[:-1]))
    nxt = np.concatenate((word[1:], [False]))
    starts = np.flatnonzero(word & ~prev)
    ends = np.flatnonzero(word & ~nxt) + 1  # exclusive
    pw, ipw = _powers(buf.size + 1)
    with np.errstate(over="ignore"):
        prefix = np.cumsum(buf.astype(np.uint64) * pw[: buf.size], dtype=np.uint64)
        prefix = np.concatenate((np.zeros(1, np.uint64), prefix))
        raw = (prefix[ends] - prefix[starts]) * ipw[starts]  # the polynomial hash of each word alone
        word_hash = mix64(raw ^ (ends - starts).astype(np.uint64))
    word_doc = np.searchsorted(doc_starts, starts, side="right") - 1
    words_per_doc = np.bincount(word_doc, minlength=n_docs).astype(np.int64)
    first_word = np.concatenate(([0], np.cumsum(words_per_doc)[:-1]))
    n_words = word_hash.size

    # shingle at word j = mix(sum_k word[j+k] * WORD_BASE**k), over words of j's own document only.
    acc = np.zeros(n_words, np.uint64)
    coef = np.uint64(1)
    with np.errstate(over="ignore"):
        for k in range(ngram):
            if k >= n_words:
                break
            same = np.zeros(n_words, bool)
            same[: n_words - k] = word_doc[k:] == word_doc[: n_words - k]
            shifted = np.zeros(n_words, np.uint64)
            shifted[: n_words - k] = word_hash[k:]
            acc += np.where(same, shifted * coef, np.uint64(0))
            coef = coef * _WORD_BASE
        shingles = mix64(acc)
    pos_in_doc = np.arange(n_words) - first_word[word_doc]
    doc_words = words_per_doc[word_doc]
    keep = (pos_in_doc + ngram <= doc_words) | ((doc_words < ngram) & (pos_in_doc == 0))
    shingles = shingles[keep]
    per_doc = np.bincount(word_doc[keep], minlength=n_docs).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(per_doc))).astype(np.int64)
    return ShingleBatch(shingles, offsets, words_per_doc)


class MinHasher:
    """MinHash signatures (uint32 x num_perm per document) over shingle hashes.

    The permutations are rensa's (a Rust kernel fed our flat hash buffer); the seed fixes them, so
    signatures from different workers and runs are comparable.
    """

    def __init__(self, num_perm: int, seed: int = 1):
        import rensa

        self.num_perm = num_perm
        self.seed = seed
        self._rmh = rensa.RMinHash

    def signatures(self, batch: ShingleBatch) -> np.ndarray:
        n_docs = batch.offsets.size - 1
        if n_docs == 0:
            return np.zeros((0, self.num_perm), np.uint32)
        matrix = self._rmh.digest_matrix_from_flat_token_hashes(
            batch.hashes, batch.offsets.astype(np.uint64), self.num_perm, self.seed
        )
        sig = np.asarray(matrix.to_rows() if not hasattr(matrix, "__array__") else matrix, dtype=np.uint32)
        return sig.reshape(n_docs, self.num_perm)


def band_buckets(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit bucket hash per (document, band): int64 array of shape (docs, bands)."""
    n = signatures.shape[0]
    sig = signatures[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    acc = np.zeros((n, bands), np.uint64)
    coef = np.uint64(1)
    with np.errstate(over="ignore"):
        for k in range(rows):
            acc += sig[:, :, k] * coef
            coef = coef * _BAND_BASE
        acc = mix64(acc ^ (np.arange(bands, dtype=np.uint64) * _WORD_BASE)[None, :])
    return acc.view(np.int64)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that two documents of this Jaccard similarity share at least one band bucket."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def choose_bands(
    num_perm: int, threshold: float, recall_target: float = 0.995, low: float | None = None
) -> tuple[int, int]:
    """Bands x rows for LSH candidates: the fewest candidate pairs that still catch pairs at the
    threshold with `recall_target` probability. Candidates are verified afterwards, so a false
    candidate costs a little time, a missed one costs a duplicate: recall comes first.

    Among the (b, r) with b*r <= num_perm that reach the target at the threshold, pick the one with
    the lowest candidate probability at `low` (default: threshold - 0.25), i.e. the steepest curve.
    """
    low = max(0.05, threshold - 0.25) if low is None else low
    best: tuple[float, int, int] | None = None
    fallback: tuple[float, int, int] | None = None
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if b < 1:
            break
        p_hit = candidate_probability(threshold, b, r)
        p_low = candidate_probability(low, b, r)
        if p_hit >= recall_target and (best is None or p_low < best[0]):
            best = (p_low, b, r)
        if fallback is None or p_hit > fallback[0]:
            fallback = (p_hit, b, r)
    chosen = best or fallback
    return chosen[1], chosen[2]


def jaccard_sorted_unique(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)
