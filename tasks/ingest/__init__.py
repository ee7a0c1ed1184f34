"""Ingest local files and datasets on disk into the document schema."""

from tasks.ingest.stage import IngestConfig, IngestStage

__all__ = ["IngestConfig", "IngestStage"]
