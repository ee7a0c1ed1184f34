"""Fine-tuning through OpenAI's API: the `openai_export` (validated JSONL) and `openai_train` stages."""

from tasks.openai.export import OpenAIExportConfig, OpenAIExportStage
from tasks.openai.train import OpenAITrainConfig, OpenAITrainStage

__all__ = ["OpenAIExportConfig", "OpenAIExportStage", "OpenAITrainConfig", "OpenAITrainStage"]
