"""Tokenizers and tokenization: the `tokenizer`, `sft_ingest` and `tokenize` stages."""

from tasks.tokenize.sft_ingest import SftIngestConfig, SftIngestStage
from tasks.tokenize.stage import IGNORE_INDEX, TokenizeConfig, TokenizeStage
from tasks.tokenize.tokenizer_stage import TokenizerConfig, TokenizerStage

__all__ = [
    "IGNORE_INDEX",
    "SftIngestConfig",
    "SftIngestStage",
    "TokenizeConfig",
    "TokenizeStage",
    "TokenizerConfig",
    "TokenizerStage",
]
