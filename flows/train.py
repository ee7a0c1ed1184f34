"""The training flow: one training run over the committed packed dataset (the data flow's output)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.data import run_data_stages


@flow(name="kiln-train", log_prints=True)
def train_flow(config: PipelineConfig, refresh: bool = False) -> dict[str, dict[str, Any]]:
    """Train on the packed dataset `config` describes (run the data flow first). A rerun of a failed or
    killed run resumes from its last checkpoint; `refresh` retrains from scratch."""
    return run_data_stages(config, only="train", refresh=["train"] if refresh else [])
