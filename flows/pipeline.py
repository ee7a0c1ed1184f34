"""The end-to-end flow. Today it runs the data stages; training and evaluation join as they land."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.data import run_data_stages


@flow(name="kiln-pipeline", log_prints=True)
def pipeline(
    config: PipelineConfig,
    only: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Raw text to artifacts, stage by stage; every stage's output is content-addressed and cached."""
    return run_data_stages(config, only, from_stage, refresh)
