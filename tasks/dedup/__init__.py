"""Exact and MinHash near-duplicate removal (see stages.py for the map -> shuffle -> reduce chain)."""

from tasks.dedup.config import DedupConfig
from tasks.dedup.stages import (
    DedupCandidatesStage,
    DedupClustersStage,
    DedupStage,
    MinHashStage,
    run_dedup_chain,
)

__all__ = ["DedupCandidatesStage", "DedupClustersStage", "DedupConfig", "DedupStage", "MinHashStage", "run_dedup_chain"]
