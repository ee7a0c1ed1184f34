"""The train stage: one DeepSpeed run over a packed dataset, committed as a model artifact.

Inputs: the pack stage's artifact (its `hf/` DatasetDict) and, optionally, the tokenizer artifact.
Output: the artifact directory *is* a `save_pretrained` directory (config.json, model.safetensors,
tokenizer files; `adapter/` for PEFT methods), plus `deepspeed_config.json`, `metrics.json`,
`loss_curve.png`, `report.md`, `tensorboard/` and `checkpoints/` (resumable DeepSpeed checkpoints).
A killed or failed run leaves its checkpoints in the staging directory; the rerun resumes from them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import pyarrow as pa

from tasks.artifacts import Artifact, ArtifactWriter, StageStats
from tasks.stage import Stage, StageInputError
from tasks.train import launch
from tasks.train.config import TrainConfig

log = logging.getLogger("kiln.train")


class TrainStage(Stage):
    name = "train"
    version = 1
    Config = TrainConfig

    def sources(self, cfg: TrainConfig) -> Any:
        path = cfg.model.name_or_path
        if path and os.path.isdir(path):  # a local model: its files are part of what the run depends on
            return sorted(
                (os.path.relpath(os.path.join(r, n), path), os.path.getsize(os.path.join(r, n)))
                for r, _, files in os.walk(path) for n in files
            )
        return None

    def plan(self, inputs: list[Artifact], cfg: TrainConfig) -> list[dict[str, Any]]:
        if not inputs:
            raise StageInputError("inputs", "train needs the pack stage's output")
        return [{"run": 0}]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: TrainConfig, out: ArtifactWriter) -> StageStats:
        launch.check_hardware(cfg)
        work = None if out.scratch is not None else LocalWork(out)
        if work is None:
            pack_dir = inputs[0].path
            tokenizer_dir = inputs[1].path if len(inputs) > 1 else None
            out_dir, scratch = out.directory, out.scratch
        else:  # a remote store: the ranks read and write local files, uploaded when the run is done
            pack_dir = work.fetch(inputs[0], ("hf", "tokenizer"))
            tokenizer_dir = work.fetch(inputs[1]) if len(inputs) > 1 else None
            out_dir, scratch = work.output, work.scratch
        data_dir = os.path.join(pack_dir, "hf") if os.path.isdir(os.path.join(pack_dir, "hf")) else pack_dir
        packed_tokenizer = os.path.join(pack_dir, "tokenizer")  # the pack stage keeps a copy
        if tokenizer_dir is None and os.path.isdir(packed_tokenizer):
            tokenizer_dir = packed_tokenizer
        ds_config = launch.deepspeed_config(cfg, launch.world_size(cfg))
        with open(os.path.join(out_dir, "deepspeed_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)
        run = {
            "config": cfg.model_dump(mode="json"),
            "deepspeed_config": ds_config,
            "dataset_dir": data_dir,
            "tokenizer_dir": tokenizer_dir,
            "output_dir": out_dir,
        }
        run_json = os.path.join(scratch, "run.json")
        with open(run_json, "w") as f:
            json.dump(run, f, indent=2)
        repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        def on_event(event: dict[str, Any]) -> None:
            if event.get("kiln") == "train":
                out.progress(event["step"] / cfg.max_steps, f"step {event['step']}/{cfg.max_steps}, loss {event['loss']:.4f}")

        launch.run(cfg, run_json, on_event=on_event, cwd=repo_root)

        with open(os.path.join(out_dir, "metrics.json")) as f:
            metrics = json.load(f)
        history = metrics["history"]
        write_report(out_dir, cfg, metrics)
        if work is not None:
            work.upload()
        out.table("metrics").write(_history_table(history))
        train = [h for h in history if h["kind"] == "train"]
        val = [h for h in history if h["kind"] == "validation"]
        stats = StageStats()
        stats.extra.update(
            steps=metrics["steps"],
            tokens_trained=metrics["tokens"],
            final_train_loss=train[-1]["loss"] if train else None,
            first_validation_loss=val[0]["loss"] if val else None,
            final_validation_loss=val[-1]["loss"] if val else None,
            final_perplexity=val[-1]["perplexity"] if val else None,
            tokens_per_s=train[-1]["tokens_per_s"] if train else None,
            trainable_parameters=metrics["trainable_parameters"],
            parameters=metrics["parameters"],
        )
        if metrics.get("stopped"):
            stats.extra["stopped"] = metrics["stopped"]
        return stats


class LocalWork:
    """Local files for a run whose artifact store is remote (s3://, gs://, ...): the inputs the ranks read
    are downloaded once, the output directory and checkpoints live on local disk while the run goes, and
    the finished output is uploaded into the artifact's staging directory.

    The directory is named after the artifact's staging path, so a killed run resumes from its local
    checkpoints when it is rerun on the same machine. It sits under $KILN_TRAIN_CACHE (default
    ~/.cache/kiln/train); for several nodes, put that on a filesystem every node mounts at the same path.
    It is removed once the upload is complete.
    """

    def __init__(self, out: ArtifactWriter):
        self.out = out
        key = hashlib.sha256(out.fs.unstrip_protocol(out.directory).encode()).hexdigest()[:20]
        base = os.environ.get("KILN_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kiln", "train")
        self.root = os.path.join(base, key)
        self.output = os.path.join(self.root, "output")
        self.scratch = os.path.join(self.root, "scratch")
        os.makedirs(self.output, exist_ok=True)
        os.makedirs(self.scratch, exist_ok=True)

    def fetch(self, artifact: Artifact, parts: tuple[str, ...] | None = None) -> str:
        """A local copy of the artifact (or of the named subdirectories of it), downloaded once."""
        dest = os.path.join(self.root, "inputs", artifact.fingerprint)
        done = os.path.join(dest, ".complete")
        if os.path.exists(done):
            return dest
        fs = artifact.fs
        base = fs._strip_protocol(artifact.path).rstrip("/")
        wanted = [f"{base}/{p}" for p in parts] if parts else [base]
        n = 0
        for top in wanted:
            if not fs.exists(top):
                continue
            for remote in fs.find(top):
                local = os.path.join(dest, os.path.relpath(remote, base))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(remote, local)
                n += 1
        log.info("fetched %d file(s) of %s into %s", n, artifact.path, dest)
        open(done, "w").close()
        return dest

    def upload(self) -> None:
        fs, remote = self.out.fs, self.out.directory.rstrip("/")
        n = 0
        for root, _, files in os.walk(self.output):
            rel = os.path.relpath(root, self.output)
            target = remote if rel == "." else f"{remote}/{rel.replace(os.sep, '/')}"
            fs.makedirs(target, exist_ok=True)
            for name in files:
                fs.put_file(os.path.join(root, name), f"{target}/{name}")
                n += 1
        log.info("uploaded %d file(s) of the trained model to %s", n, fs.unstrip_protocol(remote))
        shutil.rmtree(self.root, ignore_errors=True)


def _history_table(history: list[dict[str, Any]]) -> pa.Table:
    def col(key: str) -> list:
        return [h.get(key) for h in history]

    return pa.table({
        "kind": pa.array(col("kind"), pa.string()),
        "step": pa.array(col("step"), pa.int64()),
        "loss": pa.array(col("loss"), pa.float64()),
        "perplexity": pa.array(col("perplexity"), pa.float64()),
        "lr": pa.array(col("lr"), pa.float64()),
        "tokens_per_s": pa.array(col("tokens_per_s"), pa.float64()),
        "mfu": pa.array(col("mfu"), pa.float64()),
    })


def write_report(out_dir: str, cfg: TrainConfig, metrics: dict[str, Any]) -> None:
    """loss_curve.png and report.md (the Prefect layer publishes report.md as the stage's markdown artifact)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = metrics["history"]
    train = [h for h in history if h["kind"] == "train"]
    val = [h for h in history if h["kind"] == "validation"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train")
    if val:
        ax.plot([h["step"] for h in val], [h["loss"] for h in val], marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{cfg.method.method} / ZeRO-{cfg.deepspeed.zero_stage}")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "loss_curve.png")
    fig.savefig(png)
    plt.close(fig)
    with open(png, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    lines = [
        f"# Training: {cfg.method.method}, ZeRO-{cfg.deepspeed.zero_stage}, {metrics['steps']} steps",
        "",
        f"{metrics['tokens']:,} tokens; {metrics['trainable_parameters']:,} of {metrics['parameters']:,} parameters trained.",
        "",
        "| step | train loss | validation loss | perplexity | tokens/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_step: dict[int, dict[str, Any]] = {}
    for h in history:
        by_step.setdefault(h["step"], {}).update({f"{h['kind']}_{k}": v for k, v in h.items()})
    for step, row in sorted(by_step.items()):
        def fmt(v, spec=".4f"):
            return "" if v is None else format(v, spec)
        lines.append(f"| {step} | {fmt(row.get('train_loss'))} | {fmt(row.get('validation_loss'))} | "
                     f"{fmt(row.get('validation_perplexity'), '.2f')} | {fmt(row.get('train_tokens_per_s'), ',.0f')} |")
    if metrics.get("stopped"):
        lines += ["", f"Stopped early: {metrics['stopped']}"]
    lines += ["", f"![loss curve]({data_uri})", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
