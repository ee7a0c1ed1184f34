"""Deterministic per-document decisions: the train / validation split and multi-task mixture sampling.

Both are decided from a hash of the document id (and a seed), never from the order documents arrive
in, so every unit decides alone, in parallel, and the same document always lands in the same split,
whichever dataset or repetition it comes from: no document is in both splits.

A mixture gives each input dataset a weight (its target share of the mixture's tokens) and an optional
token cap. Without `total_tokens`, the mixture is as large as it can be without repeating any
document: the dataset that is scarcest relative to its weight is taken whole and the others are
subsampled to match. With `total_tokens`, a dataset smaller than its share is repeated (upsampled).
A dataset is sampled at rate r = budget / available tokens: each document is taken floor(r) times,
plus once more with probability frac(r), so realised token counts approach the budgets on large
datasets; the manifest records what was realised.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


def unit_interval(seed: int, *parts: str) -> float:
    """A deterministic pseudo-random number in [0, 1) for (seed, parts)."""
    key = "\x1f".join([str(seed), *parts]).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64


def in_validation(doc_id: str, fraction: float, seed: int) -> bool:
    return fraction > 0 and unit_interval(seed, "split", doc_id) < fraction


@dataclass(frozen=True)
class MixturePart:
    name: str
    weight: float
    available_tokens: int
    max_tokens: int | None = None


def sampling_rates(parts: list[MixturePart], total_tokens: int | None) -> dict[str, dict[str, float]]:
    """Per dataset: target share, token budget and sampling rate."""
    weight_sum = sum(p.weight for p in parts)
    shares = {p.name: p.weight / weight_sum for p in parts}
    if total_tokens is None:
        usable = [
            min(p.available_tokens, p.max_tokens or p.available_tokens) / shares[p.name]
            for p in parts
            if shares[p.name] > 0
        ]
        total = min(usable) if usable else 0.0
    else:
        total = float(total_tokens)
    plan = {}
    for p in parts:
        budget = shares[p.name] * total
        if p.max_tokens is not None:
            budget = min(budget, float(p.max_tokens))
        rate = budget / p.available_tokens if p.available_tokens else 0.0
        if abs(rate - round(rate)) < 1e-9:  # the limiting dataset: exactly whole, not 0.9999999 by rounding
            rate = float(round(rate))
        plan[p.name] = {
            "weight": p.weight,
            "target_share": shares[p.name],
            "available_tokens": p.available_tokens,
            "budget_tokens": budget,
            "rate": rate,
        }
    return plan


def copies(rate: float, seed: int, dataset: str, doc_id: str) -> int:
    """How many times a document is taken at this sampling rate (0 = left out)."""
    if rate == 1.0:
        return 1
    whole = math.floor(rate)
    fraction = rate - whole
    return whole + (1 if fraction > 0 and unit_interval(seed, "mix", dataset, doc_id) < fraction else 0)
