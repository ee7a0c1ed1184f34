"""The pipeline config: one pydantic model composing every stage's config, loaded from YAML.

The same model is the flows' parameter, so a Prefect deployment shows it as a validated form and the
server refuses bad values before a run exists.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.clean import CleanConfig
from tasks.crawl import CrawlConfig
from tasks.dedup import DedupConfig
from tasks.ingest import IngestConfig
from tasks.langid import LangIdConfig
from tasks.pack import PackConfig
from tasks.tokenize import SftIngestConfig, SftTokenizeConfig, TokenizeConfig, TokenizerConfig
from tasks.train.config import TrainConfig

# The stages in pipeline order, each with what it reads:
#   "docs"  -- the current documents: the output of the last enabled document stage before it, or else
#              of every enabled source stage (their shards are read together);
#   a name  -- that stage's output (the stage must be enabled).
PIPELINE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("crawl", ()),
    ("ingest", ()),
    ("clean", ("docs",)),
    # dedup is map -> shuffle -> reduce -> filter, each phase its own artifact, all set by the `dedup` section
    ("minhash", ("docs",)),
    ("dedup_candidates", ("minhash",)),
    ("dedup_clusters", ("dedup_candidates", "docs")),
    ("dedup", ("docs", "dedup_clusters")),
    ("langid", ("docs",)),
    ("sft_ingest", ()),  # instruction data: not a source of plain documents
    ("tokenizer", ("docs?",)),  # `?`: read when enabled (a loaded tokenizer needs no documents)
    ("tokenize", ("docs", "tokenizer")),
    ("sft_tokenize", ("sft_ingest", "tokenizer")),
    ("pack", ("tokenize?", "sft_tokenize?")),
    ("train", ("pack", "tokenizer?")),
)
SOURCE_STAGES = frozenset({"crawl", "ingest"})  # documents from outside the store
DOCUMENT_STAGES = frozenset({"clean", "dedup", "langid"})  # documents in, documents out (filters)
# Stages configured by another stage's section.
CONFIG_SECTION = {"minhash": "dedup", "dedup_candidates": "dedup", "dedup_clusters": "dedup"}
DATA_STAGES: tuple[str, ...] = tuple(name for name, _ in PIPELINE)


class StoreConfig(BaseModel):
    """Where artifacts live. Shard sizes shape files, not content, so they are not fingerprinted."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(".kiln/artifacts", description="Local directory or fsspec URL (s3://, gs://, ...).")
    shard_rows: int = Field(100_000, ge=1, description="Roll to a new Parquet shard after this many rows.")
    shard_mb: int = Field(128, ge=1, description="... or after this many MiB of (uncompressed) Arrow data.")


class RuntimeConfig(BaseModel):
    """Which Prefect task runner spreads the stages' units of work."""

    model_config = ConfigDict(extra="forbid")

    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads",
        description="'threads': in-process thread pool (the default). 'dask': a Dask cluster (prefect-dask). "
        "'ray': a Ray cluster (pip install 'kiln[ray]').",
    )
    workers: int = Field(2, ge=1, le=1024, description="Threads, or worker processes / CPUs of a local cluster.")
    dask_address: str | None = Field(
        None, description="Scheduler address of an existing Dask cluster (tcp://host:8786); none starts a local one."
    )
    ray_address: str | None = Field(
        None, description="Address of an existing Ray cluster (ray://host:10001 or auto); none starts a local one."
    )


class PipelineConfig(BaseModel):
    """A Kiln pipeline: which stages run, with what settings, storing artifacts where."""

    model_config = ConfigDict(extra="forbid", title="Kiln pipeline")

    name: str = Field("kiln", description="A name for this pipeline, shown in logs and reports.")
    store: StoreConfig = Field(default_factory=StoreConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    crawl: CrawlConfig | None = Field(
        None, description="Crawl web sites, read WARC files (Common Crawl) and source code trees into documents."
    )
    ingest: IngestConfig | None = Field(None, description="Read local files / datasets into documents.")
    clean: CleanConfig | None = Field(None, description="Quality, repetition and length filters; normalisation.")
    dedup: DedupConfig | None = Field(None, description="Exact and MinHash near-duplicate removal.")
    langid: LangIdConfig | None = Field(None, description="fastText language identification and filtering.")
    sft_ingest: SftIngestConfig | None = Field(None, description="Read instruction data (Alpaca / chat) into documents.")
    tokenizer: TokenizerConfig | None = Field(None, description="Train a byte-level BPE on the documents, or load one.")
    tokenize: TokenizeConfig | None = Field(None, description="Documents -> token ids.")
    sft_tokenize: SftTokenizeConfig | None = Field(None, description="Instruction examples -> token ids, prompts masked.")
    pack: PackConfig | None = Field(None, description="Token ids -> fixed-length training rows, train/validation split.")
    train: TrainConfig | None = Field(None, description="DeepSpeed training on the packed dataset.")

    def stage_config(self, name: str):
        return getattr(self, CONFIG_SECTION.get(name, name))


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid pipeline config"]
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed here; check its spelling and indentation)"
        lines.append(f"  {_loc(e['loc'])}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> PipelineConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a pipeline config is a mapping of sections, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML scalars/lists) into a nested mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. store.root=/data/kiln")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def load_config(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML pipeline config, applying `--set key=value` overrides on top."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        if data is not None and not isinstance(data, dict):
            return parse_config(data, path)
        data = deep_merge(data or {}, parse_overrides(overrides))
        path = f"{path} (with --set {' '.join(overrides)})"
    return parse_config(data, path)
