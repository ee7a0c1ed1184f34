"""Resumable DeepSpeed checkpoints whose `latest` pointer only ever names a whole checkpoint.

DeepSpeed's `save_checkpoint` has rank 0 write `latest` before its closing barrier, so while another rank
is still writing its ZeRO shard, `latest` already names the new tag; a kill in that window leaves a
pointer to a half-written checkpoint and a run that cannot resume. Here DeepSpeed writes no pointer: once
`save_checkpoint` has returned on every rank (it ends in a barrier), rank 0 writes `latest` beside and
renames it into place. A kill at any moment leaves `latest` naming the previous whole checkpoint or the
new one. The file keeps DeepSpeed's name and format, so its own tools (`zero_to_fp32.py`) still read it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

POINTER = "latest"


def save(engine: Any, directory: str, tag: str, client_state: dict[str, Any], rank: int) -> None:
    """Save `engine` under `directory/tag` on every rank, then point `latest` at it (rank 0)."""
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
    if rank == 0:
        tmp = os.path.join(directory, f".{POINTER}.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, POINTER))


def latest(directory: str) -> str | None:
    """The tag `latest` names, when that checkpoint's directory exists."""
    path = os.path.join(directory, POINTER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if tag and os.path.isdir(os.path.join(directory, tag)) else None


def prune(directory: str, prefix: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints named `prefix<number>` (never the one `latest` names)."""
    if not os.path.isdir(directory):
        return
    tags = sorted(
        (d for d in os.listdir(directory) if d.startswith(prefix) and d[len(prefix) :].isdigit()),
        key=lambda d: int(d[len(prefix) :]),
    )
    current = latest(directory)
    for tag in tags[: -max(keep, 1)]:
        if tag != current:
            shutil.rmtree(os.path.join(directory, tag), ignore_errors=True)
