"""The stage contract, and a plain (Prefect-free) runner for it.

A stage is planned into *units* of work (JSON-serialisable dicts: a file, a shard), each unit is
processed into an `ArtifactWriter`, and the finished units are committed as one artifact. The same
three calls run sequentially here (tests, `kiln stage`), or fanned out by Prefect's `.map` onto a
thread pool, Dask or Ray (flows/), with identical output.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import Artifact, ArtifactStore, ArtifactWriter, Staging, StageStats, fingerprint
from tasks.documents import DOCUMENT_SCHEMA

log = logging.getLogger("kiln.stage")


class StageConfig(BaseModel):
    """Base of every stage's config. Unknown keys are refused, naming the field.

    Fields listed in `execution_fields` change how a stage runs, not what it produces, and are left out
    of the fingerprint: raising retries or a batch size must not invalidate a finished artifact.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    execution_fields: ClassVar[frozenset[str]] = frozenset({"enabled", "retries", "retry_delay_seconds"})

    enabled: bool = Field(True, description="Run this stage. A disabled stage is skipped and its input passed on.")
    retries: int = Field(2, ge=0, le=20, description="Prefect task retries for this stage's tasks.")
    retry_delay_seconds: float = Field(
        5.0, ge=0, description="First retry delay; later retries double it (exponential backoff)."
    )

    def fingerprint_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.execution_fields))


class StageInputError(ValueError):
    """The stage cannot start with this config/input (e.g. a path that does not exist). Names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Stage(ABC):
    """One pipeline stage: pure logic over artifacts, no Prefect inside."""

    name: ClassVar[str]
    version: ClassVar[int]  # bump when the logic changes what the stage produces
    Config: ClassVar[type[StageConfig]]
    output_schema: ClassVar[pa.Schema] = DOCUMENT_SCHEMA

    def sources(self, cfg: StageConfig) -> Any:
        """Identity of what the stage reads from outside the store (None if nothing)."""
        return None

    def plan(self, inputs: list[Artifact], cfg: StageConfig) -> list[dict[str, Any]]:
        """Units of work. The default: one unit per input shard."""
        return [
            {"input": i, "shard": shard}
            for i, artifact in enumerate(inputs)
            for shard in range(len(artifact.shards()))
        ]

    @abstractmethod
    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: StageConfig, out: ArtifactWriter) -> StageStats:
        """Process one unit, writing kept rows with out.write and dropped rows with out.reject."""

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: StageConfig) -> str | None:
        """A content identity for one unit whose output depends on nothing but what the key covers. A
        unit with the same key in another committed artifact of this stage is copied from there instead
        of recomputed (the crawl: a changed code tree does not refetch an unchanged web source).
        Default None: units are never reused."""
        return None

    def finalize(self, inputs: list[Artifact], cfg: StageConfig, directory: str, fs: Any) -> dict[str, Any] | None:
        """Runs once on the complete staging directory before commit (all units done). Stages whose
        output is more than row tables -- a Hugging Face dataset, a tokenizer -- write it here and
        return manifest fields. Default: nothing."""
        return None

    def fingerprint(self, cfg: StageConfig, input_fingerprints: list[str]) -> str:
        return fingerprint(self.name, self.version, cfg.fingerprint_config(), input_fingerprints, self.sources(cfg))


# --------------------------------------------------------------------------------------------------
# registry


_REGISTERED: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Make a stage defined outside Kiln runnable by name (`kiln stage`, Prefect unit tasks)."""
    _REGISTERED[stage.name] = stage
    return stage


def stage_registry() -> dict[str, Stage]:
    """Every stage that exists, by name. Stages not built yet are absent, never stubbed."""
    from tasks.clean import CleanStage
    from tasks.crawl import CrawlStage
    from tasks.dedup import DedupCandidatesStage, DedupClustersStage, DedupStage, MinHashStage
    from tasks.ingest.stage import IngestStage
    from tasks.langid import LangIdStage
    from tasks.pack import PackStage
    from tasks.tokenize import SftIngestStage, SftTokenizeStage, TokenizerStage, TokenizeStage
    from tasks.train.stage import TrainStage

    builtin = (CrawlStage(), IngestStage(), CleanStage(), MinHashStage(), DedupCandidatesStage(), DedupClustersStage(), DedupStage(),
               LangIdStage(), SftIngestStage(), TokenizerStage(), TokenizeStage(), SftTokenizeStage(), PackStage(),
               TrainStage())
    return {**{s.name: s for s in builtin}, **_REGISTERED}


def get_stage(name: str) -> Stage:
    stages = stage_registry()
    if name not in stages:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(sorted(stages))}")
    return stages[name]


# --------------------------------------------------------------------------------------------------
# running


ProgressFn = Callable[[str, int], None]  # (event: "unit" | "rows", n)


def run_unit(
    stage: Stage,
    cfg: StageConfig,
    inputs: list[Artifact],
    staging: Staging,
    index: int,
    unit: dict[str, Any],
    progress: ProgressFn | None = None,
    on_progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Run one unit into the staging area, unless a previous attempt already finished it."""
    done = staging.unit_result(index)
    if done is not None:
        return done
    key = stage.unit_key(unit, inputs, cfg)
    if key is not None:
        adopted = staging.adopt_unit(index, key)
        if adopted is not None:
            log.info("%s unit %d: the same unit is committed in %s; copied, not recomputed",
                     stage.name, index, adopted["reused_from"])
            if progress:
                progress("rows", adopted["stats"].get("rows_in", 0))
            return adopted
    on_rows = (lambda n: progress("rows", n)) if progress else None
    writer = staging.begin_unit(index, on_rows=on_rows, on_progress=on_progress)
    t0 = time.perf_counter()
    try:
        stats = stage.process(unit, inputs, cfg, writer)
    except BaseException:
        writer.close()
        raise
    stats.seconds = time.perf_counter() - t0
    stats.bytes_out = writer.data.bytes
    return staging.finish_unit(index, writer, stats, key=key)


def manifest_header(stage: Stage, cfg: StageConfig, inputs: list[Artifact], fp: str) -> dict[str, Any]:
    return {
        "stage": stage.name,
        "stage_version": stage.version,
        "fingerprint": fp,
        "config": cfg.fingerprint_config(),
        "inputs": [{"stage": a.stage, "fingerprint": a.fingerprint, "path": a.path} for a in inputs],
        "sources": stage.sources(cfg),
    }


def run_stage(
    stage: Stage,
    cfg: StageConfig,
    inputs: list[Artifact],
    staging: Staging,
    fp: str,
    progress: ProgressFn | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> Artifact:
    """Plan, run every unit in order, commit. Resumes at the first unfinished unit."""
    t0 = time.perf_counter()
    units = stage.plan(inputs, cfg)
    if on_plan:
        on_plan(len(units))
    for i, unit in enumerate(units):
        run_unit(stage, cfg, inputs, staging, i, unit, progress)
        if progress:
            progress("unit", 1)
    header = manifest_header(stage, cfg, inputs, fp)
    header["wall_seconds"] = round(time.perf_counter() - t0, 3)
    return staging.commit(header, len(units), finalizer(stage, cfg, inputs))


def finalizer(stage: Stage, cfg: StageConfig, inputs: list[Artifact]) -> Callable[[str, Any], Any]:
    return lambda directory, fs: stage.finalize(inputs, cfg, directory, fs)


def run_in_store(
    stage: Stage,
    cfg: StageConfig,
    inputs: list[Artifact],
    store: ArtifactStore,
    refresh: bool = False,
    progress: ProgressFn | None = None,
) -> Artifact:
    """Content-addressed run: a committed artifact with this fingerprint is returned as it is."""
    fp = stage.fingerprint(cfg, [a.fingerprint for a in inputs])
    if store.is_committed(stage.name, fp) and not refresh:
        return store.open(stage.name, fp)
    staging = store.staging(stage.name, fp)
    if refresh:
        staging.recompute_all()
    return run_stage(stage, cfg, inputs, staging, fp, progress)
