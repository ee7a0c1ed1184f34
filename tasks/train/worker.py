"""The training worker: one process per rank, started by torchrun or the DeepSpeed launcher.

    python -m tasks.train.worker --spec RUN.json

RUN.json holds the TrainConfig, the DeepSpeed config, and the paths: the dataset (a DatasetDict saved
with save_to_disk), the tokenizer directory, where pretrained weights come from, and the output
directory (the artifact being built: the final model, the tokenizer, metrics, TensorBoard logs, and
`checkpoints/`, from which a rerun resumes). The recipe is tasks/train/recipe.py.

Rank 0 prints one JSON object per line for the launcher (`{"kiln": "train", ...}`); every rank prints
its errors the same way, so the task can fail with the failing rank's message. A rank dies with the
process that started it (a parent-death signal), so a killed run leaves no rank behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

EXIT_NAN = 3


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, written with a single write(): every rank shares torchrun's output pipe,
    and print() writes the text and its newline separately, so two ranks' lines could run together."""
    data = (json.dumps({"kiln": event, **fields}, default=float) + "\n").encode()
    sys.stdout.flush()
    fd = sys.stdout.fileno()
    while data:
        data = data[os.write(fd, data) :]


def train(run: dict[str, Any]) -> int:
    from tasks.train.recipe import Recipe

    recipe = Recipe(run, emit)
    recipe.setup()
    recipe.train()
    recipe.export()
    rank = recipe.rank
    recipe.cleanup()
    # Everything this rank had to write is written. The launcher accepts a rank that dies after this line
    # (DeepSpeed's ZeRO-3 ranks now and then abort during interpreter teardown on CPU).
    emit("finished", rank=rank)
    return 0


def main(argv: list[str] | None = None) -> int:
    from tasks.train.launch import die_with_parent

    die_with_parent()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", required=True, help="the run spec (JSON) written by the train stage")
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        run = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    from tasks.train.recipe import NonFiniteLoss

    try:
        return train(run)
    except NonFiniteLoss as e:
        emit("error", rank=rank, error=str(e), kind="non_finite_loss")
        return EXIT_NAN
    except BaseException as e:
        emit(
            "error", rank=rank, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2500:]
        )  # one line under PIPE_BUF
        raise


if __name__ == "__main__":
    sys.exit(main())
