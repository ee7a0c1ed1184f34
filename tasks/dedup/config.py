"""Settings shared by the dedup chain (minhash -> dedup_candidates -> dedup_clusters -> dedup)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from tasks.stage import StageConfig


class DedupConfig(StageConfig):
    """Exact and MinHash near-duplicate removal. One section configures the whole chain."""

    execution_fields = StageConfig.execution_fields | {"batch_docs"}

    exact: bool = Field(True, description="Remove documents whose normalised text is identical to an earlier one.")
    near: bool = Field(True, description="Remove near-duplicates found by MinHash LSH and verified by true Jaccard.")
    ngram: int = Field(5, ge=1, le=32, description="Words per shingle.")
    threshold: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity (of shingle sets) at which a "
        "document counts as a duplicate. Candidate pairs below it are never removed.",
    )
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations.")
    bands: int | None = Field(None, ge=1, description="LSH bands; by default derived from threshold and num_perm.")
    rows: int | None = Field(None, ge=1, description="Rows per band; set together with bands.")
    seed: int = Field(1, ge=0, description="Seed of the MinHash permutations.")
    partitions: int = Field(
        16,
        ge=1,
        le=4096,
        description="Band buckets are shuffled into this many partitions "
        "by hash prefix; each is reduced on its own (memory per reducer ~ corpus/partitions).",
    )
    keep: str = Field(
        "first",
        pattern="^(first|longest)$",
        description="Which document of a cluster survives: 'first' in corpus order, or 'longest' (ties: first).",
    )
    batch_docs: int = Field(2000, ge=1, description="Documents hashed per vectorised batch.")

    @model_validator(mode="after")
    def _bands_rows(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("bands and rows: set both or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if not (self.exact or self.near):
            raise ValueError("exact and near are both off: disable the stage instead")
        return self

    def lsh_shape(self) -> tuple[int, int]:
        from tasks.dedup.hashing import choose_bands

        if self.bands is not None:
            return self.bands, self.rows  # type: ignore[return-value]
        return choose_bands(self.num_perm, self.threshold)

    def subset(self, names: set[str]) -> dict[str, Any]:
        return {k: v for k, v in self.fingerprint_config().items() if k in names}
