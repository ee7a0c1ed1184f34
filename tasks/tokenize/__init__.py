"""Tokenizers and tokenization: the `tokenizer`, `tokenize` and `sft_tokenize` stages."""

from tasks.tokenize.stage import IGNORE_INDEX, SftTokenizeConfig, SftTokenizeStage, TokenizeConfig, TokenizeStage
from tasks.tokenize.tokenizer_stage import TokenizerConfig, TokenizerStage

__all__ = [
    "IGNORE_INDEX",
    "SftTokenizeConfig",
    "SftTokenizeStage",
    "TokenizeConfig",
    "TokenizeStage",
    "TokenizerConfig",
    "TokenizerStage",
]
