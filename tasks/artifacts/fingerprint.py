"""Fingerprints: what determines an artifact's content, hashed. The fingerprint is the artifact's path
and the cache key, so equal inputs and config give the same path, and any change gives another."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

FINGERPRINT_CHARS = 20


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace: equal values give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(stage: str, version: int, config: Any, inputs: Sequence[str] = (), sources: Any = None) -> str:
    """hash(stage, stage version, canonical config, input fingerprints[, outside-world identity]).

    `sources` identifies what a stage reads from outside the store (files and their sizes and mtimes
    for ingest), so a changed input file is a changed fingerprint.
    """
    payload = {"stage": stage, "version": version, "config": config, "inputs": list(inputs)}
    if sources is not None:
        payload["sources"] = sources
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_CHARS]
