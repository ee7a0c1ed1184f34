"""The data flow: crawl / ingest -> clean -> dedup -> langid -> tokenize -> pack (everything but training)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from flows.config import PipelineConfig
from flows.plan import plan_pipeline, select
from flows.stages import run_planned_stage


MODEL_STAGES = frozenset({"train"})


def run_data_stages(
    config: PipelineConfig,
    only: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
    skip: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """Run the enabled stages (less `skip`) in order inside the current flow; returns each one's artifact ref."""
    logger = get_run_logger()
    planned = plan_pipeline(config)
    chosen, forced = select(planned, only, from_stage, refresh or [])
    chosen = [p for p in chosen if p.name not in skip]
    by_name = {p.name: p for p in planned}
    refs: dict[str, dict[str, Any]] = {}
    for p in chosen:
        inputs = []
        for up in p.inputs:
            if up not in refs:  # an upstream stage not executed in this run (--only): use its artifact
                u = by_name[up]
                refs[up] = {"stage": up, "fingerprint": u.fingerprint, "path": u.path, "cached": True}
            inputs.append(refs[up])
        refs[p.name] = run_planned_stage(p, config, inputs, refresh=p.name in forced)
        r = refs[p.name]
        logger.info("%s %s: %s rows -> %s", p.name, "cached" if r["cached"] else "done", r.get("rows"), r["path"])
    return refs


@flow(name="kiln-data", log_prints=True)
def data_flow(
    config: PipelineConfig,
    only: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Crawl/ingest and prepare the corpus up to the packed dataset. `only`, `from_stage`, `refresh` name stages."""
    return run_data_stages(config, only, from_stage, refresh, skip=MODEL_STAGES)
