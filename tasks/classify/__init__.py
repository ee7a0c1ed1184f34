"""Sequence classification data: labelled records in (`classify_ingest`), token ids with label ids out,
split into train and validation (`classify_tokenize`); the train stage's `classification` objective
trains on it."""

from tasks.classify.ingest import ClassifyIngestConfig, ClassifyIngestStage
from tasks.classify.tokenize import ClassifyTokenizeConfig, ClassifyTokenizeStage

__all__ = ["ClassifyIngestConfig", "ClassifyIngestStage", "ClassifyTokenizeConfig", "ClassifyTokenizeStage"]
