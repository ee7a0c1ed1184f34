"""The pack stage: tokenized documents -> fixed-length training rows, split into train and validation.

Inputs: one or more tokenize artifacts (several make a multi-task mixture, `mixture` gives each a
weight and an optional token cap). Units are consecutive input shards of about `unit_mb`; documents
are packed within a unit, so memory is bounded by a unit, not by the corpus (what that costs in
padding against one global packing is measured in bench/bench_tokenize_pack.py).

Each document is first assigned to train or validation by a hash of its id, then packed with its
split's documents (`bfd` or `concat`, see tasks/pack/binpack.py). Instruction examples (inputs whose
rows carry `labels`) are never split; one longer than `seq_len` is rejected with a reason.

Output: the train rows as the artifact's data table, the validation rows as its `validation` table,
and in finalize a Hugging Face DatasetDict under `hf/` (`datasets.load_from_disk(<artifact>/hf)`) plus
the tokenizer under `tokenizer/`, so one directory is all a trainer needs.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.artifacts import Artifact, ArtifactWriter, fingerprint
from tasks.pack.binpack import pack_best_fit_decreasing, pack_concat
from tasks.pack.hf_dataset import save_dataset_dict
from tasks.pack.mixture import MixturePart, copies, in_validation, sampling_rates
from tasks.pack.rows import IGNORE_INDEX, PACKED_SCHEMA, assemble_rows
from tasks.stage import Stage, StageConfig, StageInputError

SPLITS = ("train", "validation")
_TABLE_OF_SPLIT = {"train": "data", "validation": "validation"}
_ROWS_PER_BATCH = 256  # rows assembled and written at a time (x seq_len tokens)


class MixtureComponent(BaseModel):
    """One input dataset of a mixture (components follow the order of the inputs)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, description="A label for the manifest; default: input<i>.")
    weight: float = Field(1.0, gt=0, description="Target share of the mixture's tokens, relative to the others.")
    max_tokens: int | None = Field(None, ge=1, description="Take at most about this many tokens from this dataset.")


class PackConfig(StageConfig):
    """How tokenized documents become training rows."""

    seq_len: int = Field(2048, ge=8, le=1 << 20, description="Tokens per row.")
    mode: Literal["bfd", "concat"] = Field(
        "bfd",
        description="'bfd': best-fit-decreasing bin packing of whole documents (only documents longer than "
        "seq_len are split), least padding. 'concat': concatenate and cut (classic pretraining).",
    )
    validation_fraction: float = Field(0.01, ge=0, lt=1, description="Share of documents held out for validation.")
    split_seed: int = Field(0, description="Seed of the document-level train/validation split.")
    mixture: list[MixtureComponent] | None = Field(
        None, description="Per input, in input order: weight and cap. None takes every document of every input once."
    )
    total_tokens: int | None = Field(
        None,
        ge=1,
        description="Mixture size in tokens. Without it the mixture repeats no document; with it, "
        "datasets smaller than their share are repeated.",
    )
    mixture_seed: int = Field(0, description="Seed of the mixture sampling.")
    pad_token_id: int | None = Field(
        None, ge=0, description="Padding id; default: the tokenizer's pad token, else its EOS token."
    )
    mask_piece_start: bool = Field(
        True,
        description="Label -100 on the first token of every packed piece: it would otherwise be trained as a "
        "continuation of the unrelated document before it in the row.",
    )
    unit_mb: int = Field(
        64,
        ge=1,
        description="Pack consecutive input shards of about this many MiB (compressed) together. "
        "Part of the fingerprint: which documents share a unit decides which can share a row.",
    )
    hf_dataset: bool = Field(True, description="Also write a Hugging Face DatasetDict under hf/ in the artifact.")

    @model_validator(mode="after")
    def _mixture_names_unique(self) -> PackConfig:
        if self.mixture:
            names = [c.name for c in self.mixture if c.name]
            if len(names) != len(set(names)):
                raise ValueError("mixture: component names must be unique")
        if self.total_tokens is not None and not self.mixture:
            raise ValueError("total_tokens: only applies with a mixture")
        return self


# --------------------------------------------------------------------------------------------------
# reading what the tokenize stage wrote


def _tokenizer_of(art: Artifact) -> dict[str, Any]:
    return art.manifest.get("tokenizer") or {}


def _available_tokens(art: Artifact) -> int:
    recorded = (art.manifest.get("tokens") or {}).get("tokens")
    if recorded is not None:
        return int(recorded)
    return sum(int(b.column(0).to_numpy().sum()) for b in art.iter_batches(columns=["n_tokens"]))


def _component_names(inputs: list[Artifact], cfg: PackConfig) -> list[str]:
    if cfg.mixture:
        return [c.name or f"input{i}" for i, c in enumerate(cfg.mixture)]
    return [f"input{i}" for i in range(len(inputs))]


def mixture_plan(inputs: list[Artifact], cfg: PackConfig) -> dict[str, dict[str, float]] | None:
    if not cfg.mixture:
        return None
    parts = [
        MixturePart(name, c.weight, _available_tokens(a), c.max_tokens)
        for name, c, a in zip(_component_names(inputs, cfg), cfg.mixture, inputs)
    ]
    return sampling_rates(parts, cfg.total_tokens)


class _UnitDocs:
    """The documents of one unit, flattened: all token ids in one array, each document a slice."""

    def __init__(self) -> None:
        self.ids: list[pa.Array] = []
        self.tokens: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.whole: list[np.ndarray] = []
        self.dataset: list[np.ndarray] = []
        self.valid: list[np.ndarray] = []

    def add(self, table: pa.Table, dataset: int, instruction: bool) -> None:
        ids = table.column("id").combine_chunks()
        input_ids = table.column("input_ids").combine_chunks()
        offsets = input_ids.offsets.to_numpy().astype(np.int64)
        values = input_ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        values = values[offsets[0] : offsets[-1]]
        lengths = np.diff(offsets)
        valid = np.ones(len(lengths), dtype=bool)
        if input_ids.null_count:
            valid &= ~input_ids.is_null().to_numpy(zero_copy_only=False)
        if ids.null_count:
            valid &= ~ids.is_null().to_numpy(zero_copy_only=False)
        if instruction:
            labels_col = table.column("labels").combine_chunks()
            label_offsets = labels_col.offsets.to_numpy().astype(np.int64)
            labels = labels_col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            labels = labels[label_offsets[0] : label_offsets[-1]]
            # Labels must line up with the tokens one to one; a row where they do not is bad input.
            valid &= np.diff(label_offsets) == lengths
            if len(labels) != len(values):
                labels = _realign(labels, label_offsets, offsets)
        else:
            labels = values
        self.ids.append(ids)
        self.tokens.append(values)
        self.labels.append(labels)
        self.lengths.append(lengths)
        self.whole.append(np.full(len(lengths), instruction))
        self.dataset.append(np.full(len(lengths), dataset, dtype=np.int64))
        self.valid.append(valid)

    def finish(self) -> None:
        self.doc_ids = pa.concat_arrays(self.ids) if self.ids else pa.array([], pa.string())
        self.tokens_flat = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int32)
        self.labels_flat = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32)
        self.doc_lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        self.doc_whole = np.concatenate(self.whole) if self.whole else np.zeros(0, bool)
        self.doc_dataset = np.concatenate(self.dataset) if self.dataset else np.zeros(0, np.int64)
        self.doc_valid = np.concatenate(self.valid) if self.valid else np.zeros(0, bool)
        self.doc_starts = np.zeros(len(self.doc_lengths), dtype=np.int64)
        if len(self.doc_lengths):
            np.cumsum(self.doc_lengths[:-1], out=self.doc_starts[1:])
        self.ids = self.tokens = self.labels = self.lengths = self.whole = self.dataset = self.valid = []


def _realign(labels: np.ndarray, label_offsets: np.ndarray, token_offsets: np.ndarray) -> np.ndarray:
    """Labels laid out on the tokens' offsets (rows whose lengths differ are invalid and never read)."""
    out = np.full(int(token_offsets[-1] - token_offsets[0]), IGNORE_INDEX, dtype=np.int32)
    for d in range(len(token_offsets) - 1):
        n = min(token_offsets[d + 1] - token_offsets[d], label_offsets[d + 1] - label_offsets[d])
        start = token_offsets[d] - token_offsets[0]
        out[start : start + n] = labels[label_offsets[d] - label_offsets[0] : label_offsets[d] - label_offsets[0] + n]
    return out


# --------------------------------------------------------------------------------------------------
# the stage


class PackStage(Stage):
    name = "pack"
    version = 1
    Config = PackConfig

    def plan(self, inputs: list[Artifact], cfg: PackConfig) -> list[dict[str, Any]]:
        self._check_inputs(inputs, cfg)
        units: list[dict[str, Any]] = []
        group: list[list[int]] = []
        size = 0
        for i, art in enumerate(inputs):
            for j, shard in enumerate(art.shards()):
                shard_size = art.fs.size(shard)
                if group and size + shard_size > cfg.unit_mb << 20:
                    units.append({"shards": group})
                    group, size = [], 0
                group.append([i, j])
                size += shard_size
        if group:
            units.append({"shards": group})
        return units

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: PackConfig) -> str:
        """A unit packs its own shards' documents: its key is their content (and the dataset each belongs
        to), the config, the pad id and the mixture's sampling rates -- not the other shards, so a unit of
        unchanged shards is copied when the corpus grows (units are consecutive shards: the new ones
        come after)."""
        names = _component_names(inputs, cfg)
        return fingerprint(
            f"{self.name}.unit",
            self.version,
            {
                "config": cfg.fingerprint_config(),
                "pad": self._pad_id(inputs, cfg),
                "mixture": mixture_plan(inputs, cfg),
                "shards": [[names[i], inputs[i].shard_digest(j)] for i, j in unit["shards"]],
            },
        )

    def _check_inputs(self, inputs: list[Artifact], cfg: PackConfig) -> None:
        if not inputs:
            raise StageInputError("inputs", "pack needs at least one tokenize artifact as input")
        for i, art in enumerate(inputs):
            schema = set(art.manifest.get("schema") or [])
            if art.num_rows and not {"id", "input_ids"} <= schema:
                raise StageInputError(
                    f"inputs[{i}]",
                    f"{art.stage} artifact {art.path} has no input_ids column; "
                    "pack reads the output of the tokenize stage",
                )
        fingerprints = {_tokenizer_of(a).get("fingerprint") for a in inputs if a.num_rows}
        if len(fingerprints) > 1:
            raise StageInputError(
                "inputs", f"the inputs were tokenized with different tokenizers ({sorted(map(str, fingerprints))})"
            )
        if cfg.mixture is not None and len(cfg.mixture) != len(inputs):
            raise StageInputError(
                "mixture", f"{len(cfg.mixture)} components for {len(inputs)} inputs; give one per input"
            )
        self._pad_id(inputs, cfg)

    @staticmethod
    def _pad_id(inputs: list[Artifact], cfg: PackConfig) -> int:
        if cfg.pad_token_id is not None:
            return cfg.pad_token_id
        tok = next((_tokenizer_of(a) for a in inputs if _tokenizer_of(a)), {})
        for key in ("pad_token_id", "eos_token_id"):
            if tok.get(key) is not None:
                return int(tok[key])
        raise StageInputError("pad_token_id", "the tokenizer has neither a pad nor an EOS token; set pad_token_id")

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: PackConfig, out: ArtifactWriter) -> None:
        stats = out.stats
        names = _component_names(inputs, cfg)
        plan = mixture_plan(inputs, cfg)
        docs = _UnitDocs()
        for i, j in unit["shards"]:
            art = inputs[i]
            shard = art.shards()[j]
            instruction = "labels" in (art.manifest.get("schema") or [])
            columns = ["id", "input_ids", "labels"] if instruction else ["id", "input_ids"]
            stats.bytes_in += art.fs.size(shard)
            with art.fs.open(shard, "rb") as f:
                docs.add(pq.ParquetFile(f).read(columns=columns), i, instruction)
        docs.finish()

        items: dict[str, list[int]] = {split: [] for split in SPLITS}
        ids = docs.doc_ids.to_pylist()
        stats.rows_in = len(ids)
        for d, doc_id in enumerate(ids):
            dataset = names[docs.doc_dataset[d]]
            length = int(docs.doc_lengths[d])
            reason = None
            if not docs.doc_valid[d]:
                reason, detail = "bad_row", "missing id or input_ids, or labels not aligned with input_ids"
            elif length == 0:
                reason, detail = "no_tokens", "the document has no tokens"
            elif docs.doc_whole[d] and length > cfg.seq_len:
                reason = "longer_than_seq_len"
                detail = f"{length} tokens; an instruction example is never split (seq_len {cfg.seq_len})"
            else:
                taken = copies(plan[dataset]["rate"], cfg.mixture_seed, dataset, doc_id) if plan else 1
                if not taken:
                    reason, detail = "not_sampled", f"left out of the mixture (dataset {dataset})"
            if reason:
                out.reject(reason, detail, id=doc_id, source=dataset)
                continue
            stats.rows_out += 1  # rows out: documents packed (the data rows are sequences)
            split = "validation" if in_validation(doc_id, cfg.validation_fraction, cfg.split_seed) else "train"
            items[split].extend([d] * taken)
            out.count(f"mixture.{dataset}.docs", taken)
            out.count(f"mixture.{dataset}.tokens", taken * length)
            if not docs.doc_whole[d] and length > cfg.seq_len:
                out.count("docs_split")

        pad_id = self._pad_id(inputs, cfg)
        pack = pack_best_fit_decreasing if cfg.mode == "bfd" else pack_concat
        # Parquet encoding (Arrow C++, GIL released) of one batch of rows overlaps assembling the next.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-pack-write") as writer:
            written: Future | None = None
            for split in SPLITS:
                item_doc = np.asarray(items[split], dtype=np.int64)
                if not len(item_doc):
                    continue
                rows = pack(docs.doc_lengths[item_doc].tolist(), docs.doc_whole[item_doc].tolist(), cfg.seq_len)
                table = out.data if split == "train" else out.table(_TABLE_OF_SPLIT[split])
                for start in range(0, len(rows), _ROWS_PER_BATCH):
                    batch = assemble_rows(
                        rows[start : start + _ROWS_PER_BATCH],
                        item_doc,
                        docs.doc_starts,
                        docs.tokens_flat,
                        docs.labels_flat,
                        docs.doc_ids,
                        cfg.seq_len,
                        pad_id,
                        cfg.mask_piece_start,
                    )
                    if written is not None:
                        written.result()
                    written = writer.submit(table.write, batch)
                real = int(docs.doc_lengths[item_doc].sum())
                out.count(f"{split}.sequences", len(rows))
                out.count(f"{split}.tokens", real)
                out.count(f"{split}.pad_tokens", len(rows) * cfg.seq_len - real)
            if written is not None:
                written.result()

    # ----------------------------------------------------------------------------------------------

    def finalize(self, inputs: list[Artifact], cfg: PackConfig, directory: str, fs: Any) -> dict[str, Any]:
        base = directory.rstrip("/")
        shards = {
            "train": sorted(fs.glob(f"{base}/part-*.parquet")),
            "validation": sorted(fs.glob(f"{base}/validation/part-*.parquet")),
        }
        packing: dict[str, Any] = {"mode": cfg.mode, "seq_len": cfg.seq_len}
        for split, paths in shards.items():
            sequences = tokens = 0
            for path in paths:
                with fs.open(path, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(columns=["n_tokens"], batch_size=65_536):
                        n = batch.column(0).to_numpy()
                        sequences += len(n)
                        tokens += int(n.sum())
            slots = sequences * cfg.seq_len
            packing[split] = {
                "sequences": sequences,
                "tokens": tokens,
                "pad_tokens": slots - tokens,
                "efficiency": round(tokens / slots, 6) if slots else None,
            }
        fields: dict[str, Any] = {"packing": packing}
        plan = mixture_plan(inputs, cfg)
        if plan:
            fields["mixture"] = plan
        if cfg.hf_dataset:
            splits = save_dataset_dict(fs, shards, PACKED_SCHEMA, f"{base}/hf")
            fields["hf_dataset"] = {"path": "hf", "splits": splits}
        tokenizer = next((_tokenizer_of(a) for a in inputs if _tokenizer_of(a)), None)
        if tokenizer:
            fields["tokenizer"] = tokenizer
            copied = _copy_tokenizer(tokenizer.get("path"), fs, f"{base}/tokenizer")
            if copied:
                fields["tokenizer"] = {**tokenizer, "copied_to": "tokenizer"}
        return fields


def _copy_tokenizer(path: str | None, fs: Any, target: str) -> bool:
    """Put the tokenizer beside the dataset, so a trainer needs one directory. Best effort: a tokenizer
    directory that has since moved is recorded in the manifest but not copied."""
    from tasks.tokenize.hf import (
        copy_tokenizer_files,
        local_directory,
        tokenizer_identity,
    )

    if not path:
        return False
    try:
        local = local_directory(path)
        tokenizer_identity(local, "tokenizer")
    except (StageInputError, OSError):
        return False
    return bool(copy_tokenizer_files(local, fs, target))
