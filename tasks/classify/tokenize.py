"""classify_tokenize: labelled documents -> token ids and label ids, split into train and validation.

Inputs: classify_ingest's documents (meta: label, optional split) and, unless `tokenizer` names a
directory, the tokenizer artifact. Text is tokenized the way a `text-classification` pipeline will
tokenize it at inference (the tokenizer's own special tokens), truncated to `max_length`. The label
ids follow `labels` (or the input's label names, sorted); a document whose label is not among them is
a reject `unknown_label`. A document goes to validation when its meta says so, or else by a hash of
its id (`validation_fraction`), like pack's split.

Output: train rows in the data table, validation rows in `validation` (id, input_ids, n_tokens,
label), a Hugging Face DatasetDict under `hf/`, the tokenizer under `tokenizer/`, and in the manifest
the label names and their counts per split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from tasks.artifacts import Artifact, ArtifactWriter, read_unit
from tasks.documents import parse_meta
from tasks.pack.hf_dataset import save_dataset_dict
from tasks.pack.mixture import in_validation
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.tokenize.hf import copy_tokenizer_files, load_tokenizer, local_directory, tokenizer_identity, tokenizer_info

LABELLED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
    ]
)
HF_SCHEMA = pa.schema([LABELLED_SCHEMA.field("input_ids"), LABELLED_SCHEMA.field("label")])


class ClassifyTokenizeConfig(StageConfig):
    """How labelled documents become a classification dataset."""

    execution_fields = StageConfig.execution_fields | {"batch_rows"}

    tokenizer: str | None = Field(
        None, description="A local tokenizer directory, used when no tokenizer artifact is an input."
    )
    max_length: int = Field(256, ge=2, le=1 << 16, description="Truncate longer texts to this many tokens.")
    labels: list[str] | None = Field(
        None,
        min_length=2,
        description="Label names in the order of their ids; default: the input's labels, sorted "
        "(numerically when they are integers). Documents with another label are rejected.",
    )
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of documents held out for validation (those whose meta names no split)."
    )
    split_seed: int = Field(0, description="Seed of the document-level train/validation split.")
    batch_rows: int = Field(512, ge=1, description="Documents per tokenizer call.")


class ClassifyTokenizeStage(Stage):
    name = "classify_tokenize"
    version = 1
    Config = ClassifyTokenizeConfig
    balanced = True
    splittable = True

    def sources(self, cfg: ClassifyTokenizeConfig) -> Any:
        return {"tokenizer": tokenizer_identity(cfg.tokenizer, "tokenizer")} if cfg.tokenizer else None

    def bindings(self, cfg: ClassifyTokenizeConfig) -> dict[str, str | None]:
        return {"docs": "classify_ingest", "tokenizer": None if cfg.tokenizer else "tokenizer"}

    @staticmethod
    def _split(inputs: list[Artifact], cfg: ClassifyTokenizeConfig) -> tuple[Artifact, str, str]:
        tok = inputs[-1] if inputs and inputs[-1].stage == "tokenizer" else None
        docs = [a for a in inputs if a is not tok]
        if len(docs) != 1:
            raise StageInputError("inputs", f"classify_tokenize reads one labelled documents artifact, got {len(docs)}")
        if tok is not None and cfg.tokenizer:
            raise StageInputError(
                "tokenizer", "a tokenizer artifact is an input already; set `tokenizer` only without one"
            )
        if tok is not None:
            return docs[0], local_directory(tok.path), "inputs[1]"
        if not cfg.tokenizer:
            raise StageInputError(
                "tokenizer", "no tokenizer: give a tokenizer artifact as the last input, or a directory"
            )
        return docs[0], cfg.tokenizer, "tokenizer"

    @staticmethod
    def label_names(docs: Artifact, cfg: ClassifyTokenizeConfig) -> list[str]:
        if cfg.labels:
            return list(cfg.labels)
        names = docs.manifest.get("labels")
        if not names:
            raise StageInputError("inputs", f"{docs.path} records no labels: is it classify_ingest's output?")
        return list(names)

    def plan(self, inputs: list[Artifact], cfg: ClassifyTokenizeConfig) -> list[dict[str, Any]]:
        docs, path, field = self._split(inputs, cfg)
        self.label_names(docs, cfg)
        load_tokenizer(path, field)
        return [{"input": 0, "shard": j} for j in range(len(docs.shards()))]

    def process(
        self, unit: dict[str, Any], inputs: list[Artifact], cfg: ClassifyTokenizeConfig, out: ArtifactWriter
    ) -> None:
        docs, path, field = self._split(inputs, cfg)
        tok = load_tokenizer(path, field)
        ids_of = {n: i for i, n in enumerate(self.label_names(docs, cfg))}
        for batch in read_unit(docs, unit, ["id", "text", "meta"], batch_rows=cfg.batch_rows, stats=out.stats):
            keep: list[tuple[str, str, int, bool]] = []
            for doc_id, text, raw in zip(*(batch.column(c).to_pylist() for c in ("id", "text", "meta"))):
                meta = parse_meta(raw)
                label = meta.get("label")
                if label is None:
                    out.reject("missing_label", "the document's meta has no label", id=doc_id, text=text, meta=raw)
                elif str(label) not in ids_of:
                    out.reject(
                        "unknown_label", f"{label!r} is not one of {list(ids_of)}", id=doc_id, text=text, meta=raw
                    )
                elif not isinstance(text, str) or not text.strip():
                    out.reject("empty_text", "no text to classify", id=doc_id, meta=raw)
                else:
                    split = meta.get("split") or (
                        "validation" if in_validation(doc_id, cfg.validation_fraction, cfg.split_seed) else "train"
                    )
                    keep.append((doc_id, text, ids_of[str(label)], split == "validation"))
            if not keep:
                continue
            encoded = tok([k[1] for k in keep], truncation=True, max_length=cfg.max_length)["input_ids"]
            rows = {"train": [], "validation": []}
            for (doc_id, text, label, val), ids in zip(keep, encoded):
                if not ids:
                    out.reject("no_tokens", "the tokenizer produced no tokens", id=doc_id, text=text)
                    continue
                rows["validation" if val else "train"].append((doc_id, ids, label))
            for split, items in rows.items():
                if not items:
                    continue
                table = pa.record_batch(
                    [
                        pa.array([r[0] for r in items], pa.string()),
                        pa.array([r[1] for r in items], pa.list_(pa.int32())),
                        pa.array([len(r[1]) for r in items], pa.int32()),
                        pa.array([r[2] for r in items], pa.int32()),
                    ],
                    schema=LABELLED_SCHEMA,
                )
                if split == "train":
                    out.write(table)
                else:
                    out.table("validation").write(table)
                    out.stats.rows_out += table.num_rows  # kept, in the other split
                out.count(f"{split}.tokens", int(sum(len(r[1]) for r in items)))
                out.count(f"{split}.truncated", sum(len(r[1]) >= cfg.max_length for r in items))

    def finalize(self, inputs: list[Artifact], cfg: ClassifyTokenizeConfig, directory: str, fs: Any) -> dict[str, Any]:
        docs, path, field = self._split(inputs, cfg)
        names = self.label_names(docs, cfg)
        base = directory.rstrip("/")
        shards = {
            "train": sorted(fs.glob(f"{base}/part-*.parquet")),
            "validation": sorted(fs.glob(f"{base}/validation/part-*.parquet")),
        }
        counts: dict[str, dict[str, int]] = {}
        for split, paths in shards.items():
            tally = np.zeros(len(names), dtype=np.int64)
            for p in paths:
                with fs.open(p, "rb") as f:
                    labels = pq.read_table(f, columns=["label"]).column("label").to_numpy()
                tally += np.bincount(labels, minlength=len(names))[: len(names)]
            counts[split] = {n: int(c) for n, c in zip(names, tally) if c}
        splits = save_dataset_dict(fs, shards, HF_SCHEMA, f"{base}/hf")
        copy_tokenizer_files(path, fs, f"{base}/tokenizer")
        tok = load_tokenizer(path, field)
        return {
            "labels": names,
            "label_counts": counts,
            "hf_dataset": {"path": "hf", "splits": splits},
            "tokenizer": {**tokenizer_info(tok), "copied_to": "tokenizer"},
            "max_length": cfg.max_length,
        }


__all__ = ["LABELLED_SCHEMA", "ClassifyTokenizeConfig", "ClassifyTokenizeStage"]
