"""Evaluation: lm-evaluation-harness tasks (registered or local YAML), held-out perplexity, classifier
metrics and generation metrics on a model artifact, cached per task; contamination checks; models compared
side by side."""

from tasks.eval.config import EvalCompareConfig, EvalConfig
from tasks.eval.stage import EvalCompareStage, EvalStage, compare_artifacts

__all__ = ["EvalCompareConfig", "EvalCompareStage", "EvalConfig", "EvalStage", "compare_artifacts"]
