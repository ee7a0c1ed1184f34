"""Preference optimisation data: prompts, preference datasets, candidate generation, scoring, pairs and
their tokenization (the SimPO / DPO loop's stages; the objectives are in tasks/train/objectives.py)."""

from tasks.prefs.generate import GenerateConfig, GenerateStage
from tasks.prefs.ingest import PrefIngestConfig, PrefIngestStage, PromptsConfig, PromptsStage
from tasks.prefs.pairs import PairsConfig, PairsStage
from tasks.prefs.score import ScoreConfig, ScoreStage
from tasks.prefs.tokenize import PrefTokenizeConfig, PrefTokenizeStage

__all__ = [
    "GenerateConfig",
    "GenerateStage",
    "PairsConfig",
    "PairsStage",
    "PrefIngestConfig",
    "PrefIngestStage",
    "PrefTokenizeConfig",
    "PrefTokenizeStage",
    "PromptsConfig",
    "PromptsStage",
    "ScoreConfig",
    "ScoreStage",
]
