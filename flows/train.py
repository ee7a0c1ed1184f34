"""The training flow: the pipeline's model half over the committed datasets (the data flow's output)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.data import run_stages
from flows.plan import data_stage_names, is_model_stage


@flow(name="kiln-train", log_prints=True)
def train_flow(config: PipelineConfig, refresh: bool = False, only: str | None = None) -> dict[str, dict[str, Any]]:
    """The model half of `config` over the committed datasets (run the data flow first): every training
    section in dependency order (an SFT run after the pretraining run it starts from), with what uses the
    models (generation, scoring, preference rounds, RL, evaluation), or just `only`. A rerun of a failed or
    killed run resumes from its last checkpoint; `refresh` retrains the models from scratch."""
    from flows.plan import plan_pipeline

    planned = plan_pipeline(config)
    data = data_stage_names(planned)
    names = [only] if only else [p.name for p in planned if p.name not in data]
    models = [p.name for p in planned if is_model_stage(p) and p.name in names]
    return run_stages(config, only=only, refresh=models if refresh else [], include=lambda p: p.name in names)
