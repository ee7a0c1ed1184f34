"""classify_ingest: labelled records (text + label; JSONL, JSON, CSV, Parquet, a saved HF dataset) -> documents.

The same readers as ingest. A record becomes a document whose meta holds its label (as a label name)
and, when the data says so, its split; a record without a usable label is a reject with the reason:
`missing_label`, `unknown_label` (not one of `labels`), `label_out_of_range` (an index past `labels`),
`bad_label` (a value that is no label: a list, a bool, a fraction). The manifest counts the labels.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from tasks.artifacts import Artifact
from tasks.documents import meta_json, parse_meta
from tasks.ingest.stage import IngestConfig, IngestStage, RecordEmitter

VALIDATION_SPLITS = {"validation", "valid", "val", "dev", "test", "eval"}
TRAIN_SPLITS = {"train", "training"}


class ClassifyIngestConfig(IngestConfig):
    """Where the labelled records come from and which fields hold the text, the label and the split."""

    label_field: str = Field("label", description="Record field holding the label: a name, or an index into `labels`.")
    labels: list[str] | None = Field(
        None,
        min_length=2,
        description="The label names, in the order of their ids. Given: other labels are rejected, and integer "
        "labels index this list (SST-2's 0/1 -> [negative, positive]). Not given: every label seen is a class.",
    )
    split_field: str | None = Field(
        None,
        description="Record field naming the split (train / validation, dev, test): such rows go to that split "
        "whatever classify_tokenize's validation_fraction says.",
    )

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("label names must be unique")
        return v


class LabelledRecordEmitter(RecordEmitter):
    cfg: ClassifyIngestConfig

    def label_of(self, raw: Any) -> tuple[str | None, tuple[str, str] | None]:
        """(label name, None) or (None, (reason, detail))."""
        names = self.cfg.labels
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None, ("missing_label", f"no {self.cfg.label_field!r} field")
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            return None, ("bad_label", f"{self.cfg.label_field!r} is a {type(raw).__name__}: {str(raw)[:80]}")
        if isinstance(raw, float):
            if not raw.is_integer():
                return None, ("bad_label", f"{raw} is not a label")
            raw = int(raw)
        if isinstance(raw, str):
            raw = raw.strip()
            if names is None or raw in names:
                return raw, None
            if not raw.lstrip("-").isdigit():
                return None, ("unknown_label", f"{raw!r} is not one of {names}")
            raw = int(raw)
        if names is None:
            return str(raw), None
        if not 0 <= raw < len(names):
            return None, ("label_out_of_range", f"{raw} is not an index of the {len(names)} labels {names}")
        return names[raw], None

    def record(self, rec: Any, where: dict[str, Any]) -> None:
        cfg = self.cfg
        text = self.text_of(rec, where)
        if text is None:
            return
        label, problem = self.label_of(rec.get(cfg.label_field))
        if problem:
            return self.reject(*problem, text, where, id=self.document_id(rec, where))
        meta = {k: v for k, v in rec.items() if k not in (cfg.text_field, cfg.id_field, cfg.label_field)}
        meta["label"] = label
        if cfg.split_field and rec.get(cfg.split_field) is not None:
            split = str(rec[cfg.split_field]).strip().lower()
            if split not in VALIDATION_SPLITS | TRAIN_SPLITS:
                return self.reject(
                    "bad_split",
                    f"{cfg.split_field}={split!r}: want train or validation/dev/test",
                    text,
                    where,
                    id=self.document_id(rec, where),
                )
            meta["split"] = "validation" if split in VALIDATION_SPLITS else "train"
        meta["_ingest"] = where
        self.keep(
            id=self.document_id(rec, where), text=text, source=self.label, url=None, lang=None, meta=meta_json(meta)
        )


class ClassifyIngestStage(IngestStage):
    name = "classify_ingest"
    version = 1
    Config = ClassifyIngestConfig
    emitter = LabelledRecordEmitter

    def finalize(self, inputs: list[Artifact], cfg: ClassifyIngestConfig, directory: str, fs: Any) -> dict[str, Any]:
        """Label counts per split, for classify_tokenize (which fixes the label ids) and for the reader."""
        import pyarrow.parquet as pq

        counts: dict[str, dict[str, int]] = {}
        for shard in sorted(fs.glob(f"{directory.rstrip('/')}/part-*.parquet")):
            with fs.open(shard, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["meta"], batch_size=8192):
                    for raw in batch.column(0).to_pylist():
                        meta = parse_meta(raw)
                        split = meta.get("split", "any")
                        counts.setdefault(split, {})
                        counts[split][meta["label"]] = counts[split].get(meta["label"], 0) + 1
        return {"label_counts": counts, "labels": cfg.labels or sorted_labels({k for c in counts.values() for k in c})}


def sorted_labels(names: set[str]) -> list[str]:
    """Label names in id order: numerically when they are all integers (0, 1, 2, 10), else alphabetically."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)
