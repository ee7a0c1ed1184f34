"""Packing tokenized documents into fixed-length training rows: the `pack` stage."""

from tasks.pack.stage import MixtureComponent, PackConfig, PackStage

__all__ = ["MixtureComponent", "PackConfig", "PackStage"]
