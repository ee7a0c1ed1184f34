"""The data flow: crawl / ingest -> clean -> dedup -> langid -> tokenize -> pack (everything but models)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from flows.config import PipelineConfig
from flows.plan import PlannedStage, data_stage_names, plan_pipeline, select
from flows.stages import run_planned_stage
from tasks.artifacts import Artifact


def run_stages(
    config: PipelineConfig,
    only: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
    include: Callable[[PlannedStage], bool] = lambda p: True,
) -> dict[str, dict[str, Any]]:
    """Run the enabled stages that `include` accepts, in dependency order, inside the current flow;
    returns each one's artifact ref. An input stage not run here must be committed already."""
    logger = get_run_logger()
    planned = plan_pipeline(config)
    chosen, forced = select(planned, only, from_stage, refresh or [])
    chosen = [p for p in chosen if include(p)]
    by_name = {p.name: p for p in planned}
    refs: dict[str, dict[str, Any]] = {}
    for p in chosen:
        inputs = []
        for up in p.inputs:
            if up not in refs:  # an upstream stage not executed in this run: use its committed artifact
                u = by_name[up]
                if not u.committed:
                    raise RuntimeError(f"{p.name} reads {up}, which has no committed artifact: run the data flow first")
                refs[up] = {"stage": u.kind, "fingerprint": u.fingerprint, "path": u.path, "cached": True}
            inputs.append(refs[up])
        refs[p.name] = run_planned_stage(p, config, inputs, refresh=p.name in forced)
        r = refs[p.name]
        note = "" if r["cached"] else Artifact.open(r["path"]).reuse_note()
        logger.info(
            "%s %s: %s rows -> %s%s",
            p.name,
            "cached" if r["cached"] else "done",
            r.get("rows"),
            r["path"],
            f" ({note})" if note else "",
        )
    return {name: ref for name, ref in refs.items() if any(p.name == name for p in chosen)}


def run_data_stages(
    config: PipelineConfig,
    only: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    return run_stages(config, only, from_stage, refresh)


@flow(name="kiln-data", log_prints=True)
def data_flow(
    config: PipelineConfig,
    only: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Crawl/ingest and prepare the corpus up to the datasets (every stage that neither uses a model nor reads
    what one made). `only`, `from_stage`, `refresh` name stages."""
    data = data_stage_names(plan_pipeline(config))
    return run_stages(config, only, from_stage, refresh, include=lambda p: p.name in data)
