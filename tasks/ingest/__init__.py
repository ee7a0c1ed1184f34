"""Ingest local files and datasets on disk: documents (`ingest`) and instruction examples (`sft_ingest`)."""

from tasks.ingest.sft import SftIngestConfig, SftIngestStage
from tasks.ingest.stage import IngestConfig, IngestStage, RecordEmitter

__all__ = ["IngestConfig", "IngestStage", "RecordEmitter", "SftIngestConfig", "SftIngestStage"]
