"""The training flow: the pipeline's model stages over the committed datasets (the data flow's output)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.data import run_stages
from flows.plan import is_model_stage


@flow(name="kiln-train", log_prints=True)
def train_flow(config: PipelineConfig, refresh: bool = False, only: str | None = None) -> dict[str, dict[str, Any]]:
    """Train the models `config` describes (run the data flow first): every training section, in
    dependency order (an SFT run after the pretraining run it starts from), or just `only`. A rerun of a
    failed or killed run resumes from its last checkpoint; `refresh` retrains from scratch."""
    from flows.plan import plan_pipeline

    models = [p.name for p in plan_pipeline(config) if is_model_stage(p)]
    names = [only] if only else models
    return run_stages(config, only=only, refresh=names if refresh else [], include=lambda p: p.name in names)
