"""Writing packed Parquet tables as a Hugging Face `DatasetDict` (save_to_disk layout).

Rows stream from Parquet into an Arrow IPC file that `datasets.Dataset.from_file` memory-maps, so
memory stays at one record batch whatever the dataset's size; `save_to_disk` then writes the final
shards. `datasets` cannot load back a split saved with zero rows, so empty splits are left out (the
manifest lists the splits written).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    from datasets.utils import (
        disable_progress_bars,
        enable_progress_bars,
        is_progress_bar_enabled,
    )

    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


def save_dataset_dict(
    fs: Any, splits: dict[str, list[str]], schema: pa.Schema, target: str, max_shard_size: str = "500MB"
) -> list[str]:
    """Write `{split: parquet shard paths on fs}` to `target` on fs; returns the splits written."""
    import datasets

    local = isinstance(fs, LocalFileSystem)
    if fs.exists(target):  # left by an earlier attempt at the commit
        fs.rm(target, recursive=True)
    # Scratch next to the target on local disks (same filesystem, and /tmp may be small).
    scratch_root = os.path.dirname(target.rstrip("/")) if local else None
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=scratch_root) as tmp, _quiet_datasets():
        parts = {}
        for split, shards in splits.items():
            arrow_path = os.path.join(tmp, f"{split}.arrow")
            rows = 0
            with pa.OSFile(arrow_path, "wb") as sink, pa.ipc.new_stream(sink, schema) as stream:
                for shard in shards:
                    with fs.open(shard, "rb") as f:
                        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=schema.names):
                            stream.write_batch(batch.cast(schema))
                            rows += batch.num_rows
            if rows:
                parts[split] = datasets.Dataset.from_file(arrow_path)
        if not parts:
            return []
        out_dir = target if local else os.path.join(tmp, "out")
        datasets.DatasetDict(parts).save_to_disk(out_dir, max_shard_size=max_shard_size)
        written = sorted(parts)
        del parts  # the memory maps of the scratch files go before the files do
        if not local:
            fs.put(out_dir, target, recursive=True)
            shutil.rmtree(out_dir, ignore_errors=True)
    return written
