"""Paths on local disk and on fsspec stores, handled alike."""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "_manifest.json"
UNITS_DIR = "_units"
LOCKS_DIR = "_locks"
NO_REUSE = "no-reuse"  # in UNITS_DIR: this artifact copies no unit from earlier ones (a refresh)
SCRATCH_DIR = "_scratch"
DATA_TABLE = "data"  # stored at the artifact's top level
REJECTS_DIR = "rejects"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or not what the caller expects."""


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(fs: fsspec.AbstractFileSystem, base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if is_local(fs) else "/".join([base.rstrip("/"), *parts])


def parent(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return os.path.dirname(path) if is_local(fs) else path.rstrip("/").rsplit("/", 1)[0]


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as a URL the user can pass back to Kiln (local paths stay plain paths)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)
