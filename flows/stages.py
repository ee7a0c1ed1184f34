"""The thin Prefect layer over a stage: mapped unit tasks plus one cached commit task.

- `stage_unit` runs one unit of work into the stage's staging area (mapped over units with `.map`, so
  the flow's task runner -- threads, Dask, Ray -- spreads them). A unit finished by an earlier, failed
  attempt is not redone.
- `stage_commit` commits the artifact and returns its ref. Its cache key is the artifact fingerprint
  (plus the store), its result is persisted as JSON, and the flow asks Prefect to refresh it whenever
  the artifact is missing: Prefect's cache alone would hand back the path of a deleted artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from typing import Any

from prefect import task, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.states import Cancelled
from prefect.tasks import exponential_backoff

from flows.config import PipelineConfig, StoreConfig
from flows.plan import PlannedStage, store_for
from tasks.artifacts import Artifact, ArtifactStore
from tasks.stage import StageInputError, UnitStopped, commit_stage, copy_units, plan_units, run_unit
from tasks.table import get_stage


def _store(store_cfg: dict[str, Any]) -> ArtifactStore:
    s = StoreConfig.model_validate(store_cfg)
    return ArtifactStore(s.root, s.shard_rows, s.shard_mb << 20)


def cache_key(kind: str, fp: str, store_root: str) -> str:
    store_id = hashlib.sha256(_store({"root": store_root}).base.encode()).hexdigest()[:10]
    return f"kiln-{kind}-{fp}-{store_id}"


def _open_inputs(input_paths: list[str], slots: list[str] | None) -> list[Artifact]:
    slots = slots or [None] * len(input_paths)
    return [Artifact.open(p, slot) for p, slot in zip(input_paths, slots)]


# log_prints off: a unit's stray prints (dill's disassembly while `datasets` hashes a function, say) would
# flood the task's log; what a stage has to say goes through its logger, forwarded below.
@task(name="stage-unit", task_run_name="{stage_name}[{index}]", persist_result=False, log_prints=False)
def stage_unit(
    stage_name: str,
    kind: str,
    cfg: dict[str, Any],
    input_paths: list[str],
    slots: list[str],
    store_cfg: dict[str, Any],
    fp: str,
    index: int,
    unit: dict[str, Any],
    n_units: int,
) -> dict[str, Any]:
    stage = get_stage(kind)
    config = stage.Config.model_validate(cfg)
    inputs = _open_inputs(input_paths, slots)
    staging = _store(store_cfg).staging(kind, fp)
    with _forward_stage_logs(), _stopped_when_cancelled(stage, staging.dir, stage_name):
        try:
            result = run_unit(
                stage, config, inputs, staging, index, unit, on_progress=_unit_progress(stage_name, index)
            )
        except UnitStopped as e:  # on purpose (a pruned HPO trial): Cancelled, so Prefect does not retry it
            get_run_logger().info("%s unit %d/%d stopped: %s", stage_name, index + 1, n_units, e)
            return Cancelled(message=f"{stage_name}: {e}")
    s = result["stats"]
    get_run_logger().info(
        "%s unit %d/%d: %d rows in, %d kept, %d rejected %s%s",
        stage_name,
        index + 1,
        n_units,
        s["rows_in"],
        s["rows_out"],
        s["rows_rejected"],
        s["rejected"] or "",
        f" (copied from {result['reused_from']})" if result.get("reused_from") else "",
    )
    tables = result["tables"]
    return {"unit": index, "rows": tables["data"]["rows"], "rejects_rows": tables["rejects"]["rows"]}


CANCEL_POLL_S = 2.0


@contextlib.contextmanager
def _stopped_when_cancelled(stage: Any, directory: str, stage_name: str):
    """While a stoppable unit (training ranks, a hosted job) runs, watch its flow run: once the run is
    cancelled -- in the UI, or through the API -- ask the stage to stop the unit (`Stage.stop`), which then
    ends with UnitStopped, keeping its checkpoints. A Prefect worker or `kiln serve` cancels a run by
    signalling its process; a run that `kiln run` executes in-process gets no signal, hence this watch."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    flow_run_id = ctx.task_run.flow_run_id if ctx is not None else None
    if not stage.stoppable or flow_run_id is None:
        yield
        return
    done = threading.Event()
    log = logging.getLogger("kiln")

    def watch() -> None:
        from prefect.client.orchestration import get_client

        cancelled = False
        with get_client(sync_client=True) as client:
            while not done.wait(CANCEL_POLL_S):
                if not cancelled:
                    try:
                        state = client.read_flow_run(flow_run_id).state
                    except Exception:  # the API away for a moment: ask again at the next poll
                        continue
                    cancelled = state is not None and (state.is_cancelling() or state.is_cancelled())
                # once cancelled, until the unit has something to stop (it may still be checking its inputs)
                if cancelled and stage.stop(directory, "the flow run was cancelled"):
                    log.warning("%s: the flow run was cancelled; stopping the unit", stage_name)
                    return

    watcher = threading.Thread(target=watch, name=f"kiln-cancel-watch-{stage_name}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def _unit_progress(stage_name: str, index: int):
    """A progress artifact for a long unit (e.g. training), created on its first report."""
    state: dict[str, Any] = {"id": None, "last": -1.0}

    def report(fraction: float, note: str) -> None:
        pct = round(100.0 * fraction, 1)
        if pct == state["last"]:
            return
        state["last"] = pct
        if state["id"] is None:
            state["id"] = create_progress_artifact(
                progress=pct,
                key=f"{stage_name.replace('_', '-').replace('.', '-')}-unit-progress",
                description=f"{stage_name} unit {index}: {note}".strip(),
            )
        else:
            update_progress_artifact(state["id"], progress=pct, description=f"{stage_name} unit {index}: {note}")

    return report


class _ToRunLogger(logging.Handler):
    def __init__(self, run_logger):
        super().__init__()
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, "%s", record.getMessage())


@contextlib.contextmanager
def _forward_stage_logs():
    """Stages log through `kiln.*` loggers (no Prefect inside them, e.g. every training rank's output);
    while a unit runs, those records go to the task run's log in Prefect too."""
    handler = _ToRunLogger(get_run_logger())
    logger = logging.getLogger("kiln")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(min(previous or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _stats_table(artifact: Artifact) -> list[dict[str, Any]]:
    st = artifact.manifest["stats"]
    rows = [
        {"metric": "rows in", "value": st["rows_in"]},
        {"metric": "rows out", "value": st["rows_out"]},
        {"metric": "rows rejected", "value": st["rows_rejected"]},
    ]
    rows += [{"metric": f"rejected: {reason}", "value": n} for reason, n in st["rejected"].items()]
    rows += [
        {"metric": "bytes in", "value": st["bytes_in"]},
        {"metric": "bytes out (arrow)", "value": st["bytes_out"]},
        {"metric": "unit seconds (sum)", "value": st["seconds"]},
        {"metric": "wall seconds", "value": artifact.manifest.get("wall_seconds")},
        {"metric": "shards", "value": len(artifact.manifest["shards"])},
        {"metric": "units", "value": artifact.manifest.get("units")},
        {"metric": "taken from earlier artifacts", "value": artifact.reuse_note() or "nothing"},
    ]
    rows += [
        {"metric": f"table {name}: rows", "value": t["rows"]}
        for name, t in artifact.manifest.get("tables", {}).items()
        if name not in ("data", "rejects") and t["rows"]
    ]
    rows += [{"metric": k, "value": v} for k, v in sorted(st.get("extra", {}).items())]
    rows.append({"metric": "path", "value": artifact.path})
    return rows


@task(
    name="stage",
    task_run_name="{stage_name}",
    cache_key_fn=lambda ctx, params: cache_key(params["kind"], params["fp"], params["store_cfg"]["root"]),
    persist_result=True,
    result_serializer="json",
)
def stage_commit(
    stage_name: str,
    kind: str,
    cfg: dict[str, Any],
    input_paths: list[str],
    slots: list[str],
    store_cfg: dict[str, Any],
    fp: str,
    n_units: int,
    wall_seconds: float,
    replace: bool = False,
) -> dict[str, Any]:
    """Commit the units into the artifact. `replace`: the units were recomputed on purpose (a refresh,
    `--from`), so the new artifact replaces a committed one -- atomically -- instead of deferring to it."""
    stage = get_stage(kind)
    config = stage.Config.model_validate(cfg)
    store = _store(store_cfg)
    staging = store.staging(kind, fp)
    if store.is_committed(kind, fp) and not (replace and staging.unit_result(0) is not None):
        artifact = store.open(kind, fp)  # committed by an earlier run whose Prefect cache is gone
    else:
        artifact = commit_stage(stage, config, _open_inputs(input_paths, slots), staging, fp, n_units, wall_seconds)
    st = artifact.manifest["stats"]
    key = stage_name.replace("_", "-").replace(".", "-")
    create_table_artifact(
        key=f"{key}-stats",
        table=_stats_table(artifact),
        description=f"**{stage_name}** `{fp}`: {st['rows_in']} rows in, {st['rows_out']} kept, "
        f"{st['rows_rejected']} rejected",
    )
    fs = artifact.fs  # a stage's own report (training: loss curve), on a local or a remote store
    own_report = fs._strip_protocol(artifact.path).rstrip("/") + "/report.md"
    markdown = _report_markdown(artifact)
    if fs.exists(own_report):
        with fs.open(own_report, "r", encoding="utf-8") as f:
            markdown = f.read() + "\n\n" + markdown
    described = getattr(stage, "report_table_descriptions", {})
    for table_name in getattr(stage, "report_tables", ()):  # e.g. the crawl's per-host report
        rows = artifact.read_table(table=table_name).to_pylist() if artifact.table_rows(table_name) else []
        if rows:
            create_table_artifact(
                key=f"{key}-{table_name.replace('_', '-')}-table",
                table=rows,
                description=f"**{stage_name}** {table_name}: {described.get(table_name, f'{len(rows)} rows')}",
            )
    create_markdown_artifact(
        key=f"{key}-report",
        markdown=markdown,
        description=f"{stage_name}: stats, rejects by reason, samples of kept and dropped rows",
    )
    return artifact.ref()


def _cell(value: Any, width: int = 160) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split())
    text = text[:width] + ("…" if len(text) > width else "")
    return text.replace("|", "\\|")


def _report_markdown(artifact: Artifact, samples: int = 3) -> str:
    m = artifact.manifest
    st = m["stats"]
    lines = [
        f"# {m['stage']} `{m['fingerprint']}`",
        "",
        f"`{artifact.path}`",
        "",
        f"**{st['rows_in']:,}** rows in, **{st['rows_out']:,}** kept, **{st['rows_rejected']:,}** rejected, "
        f"{m.get('wall_seconds', st['seconds'])} s.",
        "",
    ]
    if artifact.reuse_note():
        lines += [f"Taken from earlier artifacts: {artifact.reuse_note()}.", ""]
    if st["rejected"]:
        lines += ["| rejected because | rows |", "|---|---:|"]
        lines += [f"| {reason} | {n:,} |" for reason, n in st["rejected"].items()]
        lines.append("")
    for table, title in (("data", "Kept (first rows)"), ("rejects", "Dropped (first rows)")):
        rows = artifact.head(samples, table=table) if artifact.table_rows(table) else []
        if not rows:
            continue
        cols = [c for c in ("id", "reason", "detail", "source", "url", "text") if c in rows[0]] or list(rows[0])[:4]
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def _follow(stage_name: str, futures: Any, n_units: int) -> None:
    """A progress artifact that fills as units finish (the UI shows it on the flow run)."""
    if n_units < 2:
        return
    progress_id = create_progress_artifact(
        progress=0.0,
        key=f"{stage_name.replace('_', '-').replace('.', '-')}-progress",
        description=f"{stage_name}: units finished",
    )
    done = 0
    for _ in as_completed(futures):
        done += 1
        update_progress_artifact(progress_id, progress=100.0 * done / n_units)


def run_planned_stage(
    p: PlannedStage, config: PipelineConfig, input_refs: list[dict[str, Any]], refresh: bool
) -> dict[str, Any]:
    """Called from a flow: fan the units out, then commit (or take the committed artifact from cache)."""
    import time

    store = store_for(config)
    store_cfg = config.store.model_dump()
    cfg = p.cfg.model_dump(mode="json")
    input_paths = [r["path"] for r in input_refs]
    retry = dict(retries=p.cfg.retries, retry_delay_seconds=exponential_backoff(p.cfg.retry_delay_seconds))
    committed = store.is_committed(p.kind, p.fingerprint)
    t0 = time.perf_counter()
    n_units = 0
    common = dict(
        stage_name=p.name,
        kind=p.kind,
        cfg=cfg,
        input_paths=input_paths,
        slots=p.slots,
        store_cfg=store_cfg,
        fp=p.fingerprint,
    )
    with _naming_the_section(p):
        if refresh or not committed:
            staging = store.staging(p.kind, p.fingerprint)
            if refresh:
                staging.recompute_all()
            inputs = _open_inputs(input_paths, p.slots)
            units = plan_units(p.stage, inputs, p.cfg, config.runtime.workers)
            n_units = len(units)
            settled = copy_units(p.stage, p.cfg, inputs, staging, units)  # copies of earlier units: no task
            if settled:
                copied = [r["reused_from"] for r in settled.values() if r.get("reused_from")]
                get_run_logger().info(
                    "%s: %d of %d units need no work (%d copied from %s)",
                    p.name,
                    len(settled),
                    n_units,
                    len(copied),
                    ", ".join(sorted(set(copied))) or "-",
                )
            todo = [i for i in range(n_units) if i not in settled]
            futures = stage_unit.with_options(**retry).map(
                **{k: unmapped(v) for k, v in common.items()},
                index=todo,
                unit=[units[i] for i in todo],
                n_units=unmapped(n_units),
            )
            _follow(p.name, futures, len(todo))
            futures.result()  # raises the first failed unit's error
        ref = stage_commit.with_options(refresh_cache=refresh or not committed, **retry)(
            **common,
            n_units=n_units,
            wall_seconds=time.perf_counter() - t0,
            replace=refresh,
        )
    return {**ref, "cached": committed and not refresh}


@contextlib.contextmanager
def _naming_the_section(p: PlannedStage):
    """A stage names the field of its own config that is wrong (`path: cannot load ...`); the run says
    which section that config is (`tokenizer.path: ...`)."""
    try:
        yield
    except StageInputError as e:
        raise StageInputError(f"{p.section}.{e.field}", e.message) from None
