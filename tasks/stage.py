"""The stage contract, and a plain (Prefect-free) runner for it.

A stage is planned into *units* of work (JSON-serialisable dicts: a file, a shard, a slice of a
shard), each unit is processed into an `ArtifactWriter`, and the finished units are committed as one
artifact. The same calls run sequentially or in a process pool here (tests, `kiln stage`), or fanned
out by Prefect's `.map` onto threads, processes, Dask or Ray (flows/), with identical output.

What a stage author writes is the verdict: `process` reads its unit with `read_unit`, writes what it
keeps with `out.write` and what it drops with `out.reject(reason, detail, **row)`. The bookkeeping --
counting, reject rows, unit markers and locks, resuming, the commit -- lives here and in
tasks/artifacts, once.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import Artifact, ArtifactStore, ArtifactWriter, Staging, UnitBusy, fingerprint

log = logging.getLogger("kiln.stage")

MIN_SPLIT_ROWS = 2_000  # a shard is cut into row ranges for idle workers, never into slices smaller than this


class StageConfig(BaseModel):
    """Base of every stage's config. Unknown keys are refused, naming the field.

    Fields listed in `execution_fields` change how a stage runs, not what it produces, and are left out
    of the fingerprint: raising retries or a batch size must not invalidate a finished artifact. `kind`
    and `inputs` place a section in the pipeline; what it reads is fingerprinted as its inputs'
    fingerprints, so they are left out too.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    execution_fields: ClassVar[frozenset[str]] = frozenset({"enabled", "retries", "retry_delay_seconds"})
    wiring_fields: ClassVar[frozenset[str]] = frozenset({"kind", "inputs"})

    kind: str | None = Field(
        None,
        description="The stage kind of a section whose name is not a kind's name: a pipeline can hold "
        "several instances of a kind, e.g. `sft: {kind: train, ...}` beside `train:`.",
    )
    inputs: dict[str, str | list[str] | None] = Field(
        default_factory=dict,
        description="Which section fills each of this stage's inputs, where not the default, e.g. "
        "{data: sft_pack} or {docs: labelled}; null: the input is not read. `kiln stages CONFIG` shows every "
        "stage's inputs.",
    )
    enabled: bool = Field(True, description="Run this stage. A disabled stage is skipped and its input passed on.")
    retries: int = Field(2, ge=0, le=20, description="Prefect task retries for this stage's tasks.")
    retry_delay_seconds: float = Field(
        5.0, ge=0, description="First retry delay; later retries double it (exponential backoff)."
    )

    def fingerprint_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.execution_fields | self.wiring_fields))


class UnitStopped(RuntimeError):
    """A unit stopped on purpose before it finished (an HPO trial pruned on its validation values): not a
    failure a retry would fix. Nothing of it is committed; what it can resume from (checkpoints) is kept."""


class StageInputError(ValueError):
    """The stage cannot start with this config/input (e.g. a path that does not exist). Names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # survives the trip from a Dask / Ray / process worker
        return (type(self), (self.field, self.message))


class Stage(ABC):
    """One pipeline stage: pure logic over artifacts, no Prefect inside."""

    name: ClassVar[str]
    version: ClassVar[int]  # bump when the logic changes what the stage produces
    Config: ClassVar[type[StageConfig]]
    # rows_in == rows_out + rows_rejected in every unit (stages that keep or drop what they read)
    balanced: ClassVar[bool] = False
    # a source of records: a row whose id repeats one kept earlier becomes a `duplicate_id` reject
    unique_ids: ClassVar[bool] = False
    # units are input shards whose rows are processed one by one: a shard may be cut into row ranges
    # so that every worker has work (the output is the same rows in the same order)
    splittable: ClassVar[bool] = False
    # a unit's output depends on nothing but its input shard's rows, the config, the sources and the
    # inputs read whole (a tokenizer): it is keyed by the shard's content (shard_key), so an artifact
    # made after the corpus grew copies every unit whose shard is unchanged instead of recomputing it
    reuses_shards: ClassVar[bool] = False
    # a source: the data shards end where this column's values say (content-defined, see
    # tasks/artifacts/write.py), so documents added later leave the shards of the earlier ones as they were
    shard_cut: ClassVar[str | None] = None
    # a unit runs long outside this process (training ranks, a hosted job): while it runs, the Prefect
    # layer watches its flow run and, when the run is cancelled, calls stop(directory) (see flows/stages.py)
    stoppable: ClassVar[bool] = False

    def stop(self, directory: str, reason: str) -> bool:
        """Stop the unit being written into the staging `directory` (a stoppable stage); True if one was.
        The unit then raises UnitStopped and keeps what a rerun resumes from."""
        return False

    def sources(self, cfg: StageConfig) -> Any:
        """Identity of what the stage reads from outside the store (None if nothing)."""
        return None

    def bindings(self, cfg: StageConfig) -> dict[str, str | None]:
        """Inputs this config wires itself: slot -> section (None: the slot is not read). E.g. a
        training run whose `model.from` names another run reads that run's model. Default: none."""
        return {}

    def plan(self, inputs: list[Artifact], cfg: StageConfig) -> list[dict[str, Any]]:
        """Units of work. The default: one unit per input shard."""
        return [
            {"input": i, "shard": shard} for i, artifact in enumerate(inputs) for shard in range(len(artifact.shards()))
        ]

    @abstractmethod
    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: StageConfig, out: ArtifactWriter) -> None:
        """Process one unit: read it (`read_unit`), keep rows with `out.write`, drop rows with
        `out.reject(reason, detail, **row)`, count with `out.count(key, n)`."""

    def unit_key(self, unit: dict[str, Any], inputs: list[Artifact], cfg: StageConfig) -> str | None:
        """A content identity for one unit whose output depends on nothing but what the key covers. A
        unit with the same key in another committed artifact of this stage is copied from there instead
        of recomputed (the crawl: a changed code tree does not refetch an unchanged web source).
        Default: the shard's key for a stage that `reuses_shards`, else None (never reused)."""
        if self.reuses_shards and "shard" in unit and "input" in unit:
            return self.shard_key(unit, inputs, cfg)
        return None

    def shard_key(
        self,
        unit: dict[str, Any],
        inputs: list[Artifact],
        cfg: StageConfig,
        config: Any = None,
        whole: list[Artifact] | None = None,
        position: bool = False,
        **extra: Any,
    ) -> str:
        """The key of a unit that reads one shard (or a row range of one): the shard's content digest, not
        its place, so shards added beside it leave its key as it was. With it: the stage, its version, its
        config (`config`, where the stage fingerprints a subset), its sources, the fingerprints of the
        inputs read whole (by default those in another slot than the shard's artifact: a tokenizer),
        `position` (input and shard number) for a stage whose rows name their place, and `extra`."""
        read = inputs[unit["input"]]
        if whole is None:
            whole = [a for a in inputs if (a.slot or a.stage) != (read.slot or read.stage)]
        payload = {
            "config": cfg.fingerprint_config() if config is None else config,
            "sources": self.sources(cfg),
            "whole": [a.fingerprint for a in whole],
            "shard": read.shard_digest(unit["shard"]),
            "rows": unit.get("rows"),
            **extra,
        }
        if position:
            payload["position"] = [unit["input"], unit["shard"]]
        return fingerprint(f"{self.name}.shard", self.version, payload)

    def finalize(self, inputs: list[Artifact], cfg: StageConfig, directory: str, fs: Any) -> dict[str, Any] | None:
        """Runs once on the complete staging directory before commit (all units done). Stages whose
        output is more than row tables -- a Hugging Face dataset, a tokenizer -- write it here and
        return manifest fields. Default: nothing."""
        return None

    def fingerprint(self, cfg: StageConfig, input_fingerprints: list[str]) -> str:
        return fingerprint(self.name, self.version, cfg.fingerprint_config(), input_fingerprints, self.sources(cfg))


class UnbalancedUnit(RuntimeError):
    """A stage's unit broke rows_in == rows_out + rows_rejected: a row vanished or appeared unaccounted."""


# --------------------------------------------------------------------------------------------------
# planning


def plan_units(stage: Stage, inputs: list[Artifact], cfg: StageConfig, workers: int = 1) -> list[dict[str, Any]]:
    """The stage's units; for a splittable stage with fewer units than workers, shards are cut into row
    ranges (at least MIN_SPLIT_ROWS rows each) so that every worker has a unit. Which rows a unit holds
    does not change what the artifact contains, only how many shards it has."""
    units = stage.plan(inputs, cfg)
    if not stage.splittable or workers <= 1 or len(units) >= workers or not units:
        return units
    if not all("input" in u and "shard" in u and "rows" not in u for u in units):
        return units
    # twice as many pieces as workers: documents differ in cost, and a worker that finishes early takes
    # the next piece instead of idling while another works through an expensive half
    pieces_per_unit = math.ceil(2 * workers / len(units))
    split: list[dict[str, Any]] = []
    for u in units:
        rows = inputs[u["input"]].shard_rows()[u["shard"]]
        pieces = max(1, min(pieces_per_unit, rows // MIN_SPLIT_ROWS))
        if pieces == 1:
            split.append(u)
            continue
        bounds = [round(rows * k / pieces) for k in range(pieces + 1)]
        split += [{**u, "rows": [bounds[k], bounds[k + 1]]} for k in range(pieces)]
    return split


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
    """Run one unit into the staging area, unless a previous attempt already finished it. The unit's
    lock is held throughout, so a second run of the same artifact never writes the same unit."""
    with staging.lock_unit(index) as lock_fd:
        done = staging.unit_result(index)
        if done is not None:
            return done
        key = stage.unit_key(unit, inputs, cfg)
        if key is not None:
            adopted = staging.adopt_unit(index, key)
            if adopted is not None:
                log.info(
                    "%s unit %d: the same unit is committed in %s; copied, not recomputed",
                    stage.name,
                    index,
                    adopted["reused_from"],
                )
                if progress:
                    progress("rows", adopted["stats"].get("rows_in", 0))
                return adopted
        on_rows = (lambda n: progress("rows", n)) if progress else None
        writer = staging.begin_unit(
            index, on_rows=on_rows, on_progress=on_progress, lock_fd=lock_fd, cut_on=stage.shard_cut
        )
        t0 = time.perf_counter()
        try:
            stage.process(unit, inputs, cfg, writer)
        finally:
            writer.close()
        stats = writer.stats
        stats.seconds = time.perf_counter() - t0
        stats.bytes_out = writer.data.bytes
        if stage.balanced and stats.rows_in != stats.rows_out + stats.rows_rejected:
            raise UnbalancedUnit(
                f"{stage.name} unit {index}: {stats.rows_in} rows in, but {stats.rows_out} kept + "
                f"{stats.rows_rejected} rejected: every row read must be kept or rejected with a reason"
            )
        return staging.finish_unit(index, writer, key=key)


def copy_units(
    stage: Stage, cfg: StageConfig, inputs: list[Artifact], staging: Staging, units: list[dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """The units that need no work, settled at once: those an earlier attempt finished, and those whose
    key an earlier artifact of the stage recorded (copied from it now, each under its lock; one a live
    run is writing is left to its task). {index: result}. A flow runs tasks only for the others: on a
    grown corpus most units are copies, and a copy costs a few hard links, less than a task."""
    settled: dict[int, dict[str, Any]] = {}
    if not staging.may_reuse:
        return settled
    for i, unit in enumerate(units):
        done = staging.unit_result(i)
        if done is None:
            key = stage.unit_key(unit, inputs, cfg)
            if key is None or staging.find_unit(key) is None:
                continue
            try:
                with staging.lock_unit(i, wait_seconds=0):
                    done = staging.unit_result(i) or staging.adopt_unit(i, key)
            except UnitBusy:
                continue
        if done is not None:
            settled[i] = done
    return settled


def manifest_header(stage: Stage, cfg: StageConfig, inputs: list[Artifact], fp: str) -> dict[str, Any]:
    return {
        "stage": stage.name,
        "stage_version": stage.version,
        "fingerprint": fp,
        "config": cfg.fingerprint_config(),
        "inputs": [
            {"stage": a.stage, "fingerprint": a.fingerprint, "path": a.path, **({"slot": a.slot} if a.slot else {})}
            for a in inputs
        ],
        "sources": stage.sources(cfg),
    }


def commit_stage(
    stage: Stage,
    cfg: StageConfig,
    inputs: list[Artifact],
    staging: Staging,
    fp: str,
    n_units: int,
    wall_seconds: float | None = None,
) -> Artifact:
    """The one commit: the manifest header, unique ids for sources, the stage's finalize, the swap into place."""
    header = manifest_header(stage, cfg, inputs, fp)
    if wall_seconds is not None:
        header["wall_seconds"] = round(wall_seconds, 3)
    return staging.commit(
        header, n_units, lambda directory, fs: stage.finalize(inputs, cfg, directory, fs), unique_ids=stage.unique_ids
    )


def run_stage(
    stage: Stage,
    cfg: StageConfig,
    inputs: list[Artifact],
    staging: Staging,
    fp: str,
    progress: ProgressFn | None = None,
    on_plan: Callable[[int], None] | None = None,
    workers: int = 1,
) -> Artifact:
    """Plan, run every unit (in this process, or `workers` processes), commit. Resumes at the first
    unfinished unit."""
    t0 = time.perf_counter()
    units = plan_units(stage, inputs, cfg, workers)
    if on_plan:
        on_plan(len(units))
    if workers > 1 and len(units) > 1 and _registered(stage):
        _run_units_in_processes(stage, cfg, inputs, staging, units, workers, progress)
    else:
        for i, unit in enumerate(units):
            run_unit(stage, cfg, inputs, staging, i, unit, progress)
            if progress:
                progress("unit", 1)
    return commit_stage(stage, cfg, inputs, staging, fp, len(units), time.perf_counter() - t0)


def run_in_store(
    stage: Stage,
    cfg: StageConfig,
    inputs: list[Artifact],
    store: ArtifactStore,
    refresh: bool = False,
    progress: ProgressFn | None = None,
    workers: int = 1,
) -> Artifact:
    """Content-addressed run: a committed artifact with this fingerprint is returned as it is."""
    fp = stage.fingerprint(cfg, [a.fingerprint for a in inputs])
    if store.is_committed(stage.name, fp) and not refresh:
        return store.open(stage.name, fp)
    staging = store.staging(stage.name, fp)
    if refresh:
        staging.recompute_all()
    return run_stage(stage, cfg, inputs, staging, fp, progress, workers=workers)


# --------------------------------------------------------------------------------------------------
# units in worker processes (kiln stage --workers N)


def _registered(stage: Stage) -> bool:
    from tasks.table import stage_registry

    return type(stage_registry().get(stage.name)) is type(stage)


def _unit_in_process(
    stage_name: str,
    cfg: dict[str, Any],
    inputs: list[tuple[str, str | None]],
    staging: tuple[str, str, str, int, int, bool],
    index: int,
    unit: dict[str, Any],
) -> dict[str, Any]:
    import fsspec

    from tasks.table import get_stage

    stage = get_stage(stage_name)
    root, staging_dir, final_dir, shard_rows, shard_bytes, reuse = staging
    s = Staging(fsspec.url_to_fs(root)[0], staging_dir, final_dir, shard_rows, shard_bytes)
    s.reuse_units = reuse
    return run_unit(
        stage, stage.Config.model_validate(cfg), [Artifact.open(p, slot) for p, slot in inputs], s, index, unit
    )


def _run_units_in_processes(
    stage: Stage,
    cfg: StageConfig,
    inputs: list[Artifact],
    staging: Staging,
    units: list[dict[str, Any]],
    workers: int,
    progress: ProgressFn | None,
) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    root = staging.fs.unstrip_protocol(staging.dir)
    spec = (root, staging.dir, staging.final_dir, staging.shard_rows, staging.shard_bytes, staging.reuse_units)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per worker process
    try:
        # fork where it is safe (Linux, and no torch loaded: its OpenMP pool does not survive a fork, a forked
        # worker hangs): the workers then start with the stage's modules already imported
        safe = sys.platform.startswith("linux") and "torch" not in sys.modules
        ctx = multiprocessing.get_context("fork" if safe else "spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(units)), mp_context=ctx) as pool:
            futures = [
                pool.submit(
                    _unit_in_process,
                    stage.name,
                    cfg.model_dump(mode="json"),
                    [(a.path, a.slot) for a in inputs],
                    spec,
                    i,
                    u,
                )
                for i, u in enumerate(units)
            ]
            for fut in as_completed(futures):
                result = fut.result()
                if progress:
                    progress("rows", result["stats"].get("rows_in", 0))
                    progress("unit", 1)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
