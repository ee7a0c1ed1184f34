"""Cleaning: normalisation and keep/drop filters (length, Gopher, C4, FineWeb, code), in-document repeats."""

from tasks.clean.stage import CleanConfig, CleanStage, DocumentCleaner

__all__ = ["CleanConfig", "CleanStage", "DocumentCleaner"]
