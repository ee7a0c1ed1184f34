"""The train stage: one DeepSpeed run over a packed dataset, committed as a model artifact.

Inputs: the pack stage's artifact (its `hf/` DatasetDict) and, optionally, the tokenizer artifact.
Output: the artifact directory *is* a `save_pretrained` directory (config.json, model.safetensors,
tokenizer files; `adapter/` for PEFT methods), plus `deepspeed_config.json`, `metrics.json`,
`loss_curve.png`, `report.md`, `tensorboard/` and `checkpoints/` (resumable DeepSpeed checkpoints).
A killed or failed run leaves its checkpoints in the staging directory; the rerun resumes from them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import pyarrow as pa

from tasks.artifacts import Artifact, ArtifactWriter, StageStats
from tasks.stage import Stage, StageInputError
from tasks.train import launch
from tasks.train.config import TrainConfig

log = logging.getLogger("kiln.train")


def dataset_dir(pack: Artifact) -> str:
    hf = os.path.join(pack.path, "hf")
    return hf if os.path.isdir(hf) else pack.path


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
        if out.scratch is None:
            raise StageInputError("store.root", "training writes checkpoints and models locally: use a local store")
        launch.check_hardware(cfg)
        data_dir = dataset_dir(inputs[0])
        tokenizer_dir = inputs[1].path if len(inputs) > 1 else None
        packed_tokenizer = os.path.join(inputs[0].path, "tokenizer")  # the pack stage keeps a copy
        if tokenizer_dir is None and os.path.isdir(packed_tokenizer):
            tokenizer_dir = packed_tokenizer
        out_dir = out.directory
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
        run_json = os.path.join(out.scratch, "run.json")
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
