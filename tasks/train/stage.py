"""The train stage: one DeepSpeed run over a dataset, committed as a model artifact.

Inputs: the dataset (`data`: pack's artifact, or classify_tokenize's for a classifier; its `hf/`
DatasetDict), optionally the tokenizer artifact, and optionally another training run's model to start
from (`model`, wired by `model.from`).
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

from tasks.artifacts import Artifact, ArtifactWriter, pick
from tasks.stage import Stage, StageInputError
from tasks.train import launch
from tasks.train.config import TrainConfig

log = logging.getLogger("kiln.train")


class TrainStage(Stage):
    name = "train"
    version = 2
    Config = TrainConfig

    stoppable = True

    def stop(self, directory: str, reason: str) -> bool:
        return launch.request_stop(directory, reason)

    def sources(self, cfg: TrainConfig) -> Any:
        from tasks.train.model import model_identity

        return model_identity(cfg.model.name_or_path)  # a local model: its files are part of what the run depends on

    def bindings(self, cfg: TrainConfig) -> dict[str, str | None]:
        """The dataset: pack's (language models) or classify_tokenize's (classifiers); the starting model:
        the training section `model.from` names."""
        data = {
            "classification": "classify_tokenize",
            "simpo": "pref_tokenize",
            "dpo": "pref_tokenize",
            "reward": "pref_tokenize",
        }
        return {"data": data.get(cfg.objective, "pack"), "model": cfg.model.from_}

    @staticmethod
    def _inputs(inputs: list[Artifact], cfg: TrainConfig) -> tuple[Artifact, Artifact | None, Artifact | None]:
        data = pick(inputs, "data", ("pack", "classify_tokenize", "pref_tokenize"))
        if data is None:
            want = TrainStage().bindings(cfg)["data"]
            raise StageInputError("inputs", f"train ({cfg.objective}) needs a dataset: the {want} stage's output")
        return data, pick(inputs, "tokenizer"), pick(inputs, "model", ("train",))

    def plan(self, inputs: list[Artifact], cfg: TrainConfig) -> list[dict[str, Any]]:
        data, _, model = self._inputs(inputs, cfg)
        splits = (data.manifest.get("hf_dataset") or {}).get("splits")
        if splits is not None and "train" not in splits:
            st = data.stats
            why = ", ".join(f"{r} {n}" for r, n in st.rejected.items()) or "no input rows"
            raise StageInputError(
                "inputs",
                f"{data.path} has no training rows ({data.stage} kept {st.rows_out} of {st.rows_in}; rejected: {why})",
            )
        if cfg.objective == "classification":
            labels = data.manifest.get("labels")
            if not labels:
                raise StageInputError(
                    "objective",
                    f"classification needs a labelled dataset (classify_tokenize); "
                    f"{data.path} is a {data.stage} artifact",
                )
            counts = data.manifest.get("label_counts") or {}
            train, val = set(counts.get("train", {})), set(counts.get("validation", {}))
            if val and train != val:
                raise StageInputError(
                    "inputs",
                    f"the train and validation splits of {data.path} have different label sets: only in "
                    f"train {sorted(train - val) or '-'}, only in validation {sorted(val - train) or '-'}",
                )
        expected = self.bindings(cfg)["data"]
        if data.stage != expected:
            raise StageInputError(
                "objective",
                f"{cfg.objective} cannot train on a {data.stage} artifact: it reads the {expected} stage's output",
            )
        if model is not None and not data_model_files(model.path):
            raise StageInputError(
                "model.from",
                f"{model.path} holds no full model "
                f"(a {model.manifest.get('config', {}).get('method', {}).get('method')} "
                "run exports an adapter only); start from a full or LoRA run",
            )
        if cfg.model.init is not None:
            from tasks.train.model import model_config

            try:
                model_config(cfg, None, {}, None)
            except ValueError as e:
                field, _, message = str(e).partition(": ")
                raise StageInputError(field, message) from None
        metric, _ = cfg.monitored()
        if not reports_validation_metric(cfg.objective, metric):
            known = ", ".join(sorted(VALIDATION_METRICS.get(cfg.objective, VALIDATION_METRICS["causal_lm"])))
            raise StageInputError("monitor", f"the {cfg.objective} objective reports {known}; not {metric!r}")
        return [{"run": 0}]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: TrainConfig, out: ArtifactWriter) -> None:
        launch.check_hardware(cfg)
        data, tokenizer, model = self._inputs(inputs, cfg)
        work = None if out.scratch is not None else LocalWork(out)
        if work is None:
            data_dir, out_dir, scratch = data.path, out.directory, out.scratch
            tokenizer_dir = tokenizer.path if tokenizer else None
            model_source = model.path if model else cfg.model.name_or_path
        else:  # a remote store: the ranks read and write local files, uploaded when the run is done
            data_dir = work.fetch(data, ("hf", "tokenizer"))
            tokenizer_dir = work.fetch(tokenizer) if tokenizer else None
            model_source = (
                work.fetch(model, exclude=("checkpoints", "tensorboard")) if model else cfg.model.name_or_path
            )
            out_dir, scratch = work.output, work.scratch
        hf_dir = os.path.join(data_dir, "hf") if os.path.isdir(os.path.join(data_dir, "hf")) else data_dir
        if tokenizer_dir is None and os.path.isdir(os.path.join(data_dir, "tokenizer")):
            tokenizer_dir = os.path.join(data_dir, "tokenizer")  # the dataset stages keep a copy
        ds_config = launch.deepspeed_config(cfg, launch.world_size(cfg))
        with open(os.path.join(out_dir, "deepspeed_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)
        run = {
            "config": cfg.model_dump(mode="json"),
            "deepspeed_config": ds_config,
            "dataset_dir": hf_dir,
            "dataset_info": {k: data.manifest[k] for k in ("labels", "label_counts") if k in data.manifest},
            "tokenizer_dir": tokenizer_dir,
            "model_source": model_source,
            "output_dir": out_dir,
        }
        run_json = os.path.join(scratch, "run.json")
        with open(run_json, "w") as f:
            json.dump(run, f, indent=2)
        repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

        def on_event(event: dict[str, Any]) -> None:
            if event.get("kiln") == "train":
                out.progress(
                    event["step"] / cfg.max_steps, f"step {event['step']}/{cfg.max_steps}, loss {event['loss']:.4f}"
                )
            launch.notify(out.directory, event)  # e.g. an HPO trial's pruner, which may stop the run

        launch.run(cfg, run_json, on_event=on_event, cwd=repo_root, keep_fds=(out.lock_fd,))

        with open(os.path.join(out_dir, "metrics.json")) as f:
            metrics = json.load(f)
        history = metrics["history"]
        write_report(out_dir, cfg, metrics)
        if work is not None:
            work.upload()
        out.table("metrics").write(_history_table(history))
        out.stats.extra.update(summary_stats(metrics))

    def finalize(self, inputs: list[Artifact], cfg: TrainConfig, directory: str, fs: Any) -> dict[str, Any]:
        """What a later stage needs to know without loading the model: the tokenizer it was trained with,
        a classifier's labels, the objective."""
        data, _, _ = self._inputs(inputs, cfg)
        fields: dict[str, Any] = {"objective": cfg.objective, "method": cfg.method.method}
        if data.manifest.get("tokenizer"):
            fields["tokenizer"] = data.manifest["tokenizer"]
        if data.manifest.get("labels"):
            fields["labels"] = data.manifest["labels"]
        return fields


# The validation metrics each objective reports (a classifier also per class: precision/NAME, ...).
VALIDATION_METRICS: dict[str, set[str]] = {
    "causal_lm": {"loss", "perplexity"},
    "sft": {"loss", "perplexity"},
    "classification": {"loss", "accuracy", "f1"},
    "simpo": {"loss", "margin", "accuracy", "chosen_logps", "rejected_logps"},
    "reward": {"loss", "margin", "accuracy", "chosen_reward", "rejected_reward"},
    "dpo": {"loss", "margin", "accuracy", "chosen_logps", "rejected_logps"},
}


def reports_validation_metric(objective: str, metric: str) -> bool:
    if metric in VALIDATION_METRICS.get(objective, VALIDATION_METRICS["causal_lm"]):
        return True
    return objective == "classification" and metric.split("/")[0] in ("precision", "recall", "f1")


def data_model_files(path: str) -> bool:
    """Does a model artifact hold a full model (config.json and weights at its top level)?"""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(f"{p.rstrip('/')}/config.json")


def summary_stats(metrics: dict[str, Any]) -> dict[str, Any]:
    history = metrics["history"]
    train = [h for h in history if h["kind"] == "train"]
    val = [h for h in history if h["kind"] == "validation"]
    out: dict[str, Any] = {
        "steps": metrics["steps"],
        "tokens_trained": metrics["tokens"],
        "final_train_loss": train[-1]["loss"] if train else None,
        "first_validation_loss": val[0]["loss"] if val else None,
        "final_validation_loss": val[-1]["loss"] if val else None,
        "tokens_per_s": train[-1]["tokens_per_s"] if train else None,
        "trainable_parameters": metrics["trainable_parameters"],
        "parameters": metrics["parameters"],
        "monitor": metrics.get("monitor"),
        "best": metrics.get("best"),
        "best_step": metrics.get("best_step"),
        "exported_step": metrics.get("exported_step"),
    }
    if val and "perplexity" in val[-1]:
        out["final_perplexity"] = val[-1]["perplexity"]
    for key in ("accuracy", "f1"):
        if val and key in val[-1]:
            out[f"final_{key}"] = val[-1][key]
    if metrics.get("stopped"):
        out["stopped"] = metrics["stopped"]
    return out


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

    def fetch(self, artifact: Artifact, parts: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> str:
        """A local copy of the artifact (or of the named subdirectories of it, less `exclude`), downloaded once."""
        dest = os.path.join(self.root, "inputs", artifact.fingerprint)
        done = os.path.join(dest, ".complete")
        if os.path.exists(done):
            return dest
        fs = artifact.fs
        base = fs._strip_protocol(artifact.path).rstrip("/")
        names = parts or [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=False)]
        wanted = [n for n in names if n not in exclude and fs.exists(f"{base}/{n}")]
        os.makedirs(dest, exist_ok=True)
        for name in wanted:  # fsspec's own recursive copy, one entry of the artifact at a time
            fs.get(f"{base}/{name}", os.path.join(dest, name), recursive=fs.isdir(f"{base}/{name}"))
        log.info("fetched %s of %s into %s", ", ".join(wanted), artifact.path, dest)
        open(done, "w").close()
        return dest

    def upload(self) -> None:
        fs, remote = self.out.fs, self.out.directory.rstrip("/")
        fs.makedirs(remote, exist_ok=True)
        for name in sorted(os.listdir(self.output)):  # fsspec's own recursive copy
            local = os.path.join(self.output, name)
            fs.put(local, f"{remote}/{name}", recursive=os.path.isdir(local))
        log.info("uploaded the trained model to %s", fs.unstrip_protocol(remote))
        shutil.rmtree(self.root, ignore_errors=True)


def _history_table(history: list[dict[str, Any]]) -> pa.Table:
    """Every logged scalar, one row per (kind, step, metric): train and validation alike, whatever the
    objective reports."""
    rows = [
        (h["kind"], h["step"], k, float(v))
        for h in history
        for k, v in h.items()
        if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return pa.table(
        {
            "kind": pa.array([r[0] for r in rows], pa.string()),
            "step": pa.array([r[1] for r in rows], pa.int64()),
            "metric": pa.array([r[2] for r in rows], pa.string()),
            "value": pa.array([r[3] for r in rows], pa.float64()),
        }
    )


def write_report(out_dir: str, cfg: TrainConfig, metrics: dict[str, Any]) -> None:
    """loss_curve.png and report.md (the Prefect layer publishes report.md as the stage's markdown artifact)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = metrics["history"]
    train = [h for h in history if h["kind"] == "train"]
    val = [h for h in history if h["kind"] == "validation"]
    scores = [k for k in ("accuracy", "f1") if val and k in val[-1]]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train")
    if val:
        ax.plot([h["step"] for h in val], [h["loss"] for h in val], marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{cfg.objective}: {cfg.method.method} / ZeRO-{cfg.deepspeed.zero_stage}")
    ax.legend()
    if scores:
        ax2 = axes[0][1]
        for k in scores:
            ax2.plot([h["step"] for h in val], [h[k] for h in val], marker="o", label=f"validation {k}")
        ax2.set_xlabel("step")
        ax2.set_ylim(0, 1.02)
        ax2.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "loss_curve.png")
    fig.savefig(png)
    plt.close(fig)
    with open(png, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    extra_cols = ["perplexity"] if val and "perplexity" in val[-1] else scores
    lines = [
        f"# Training ({cfg.objective}): {cfg.method.method}, ZeRO-{cfg.deepspeed.zero_stage}, {metrics['steps']} steps",
        "",
        f"{metrics['tokens']:,} tokens; "
        f"{metrics['trainable_parameters']:,} of {metrics['parameters']:,} parameters trained.",
        "",
        "| step | train loss | validation loss | "
        + " | ".join(f"validation {c}" for c in extra_cols)
        + " | tokens/s |",
        "|---:|---:|---:|" + "---:|" * len(extra_cols) + "---:|",
    ]
    by_step: dict[int, dict[str, Any]] = {}
    for h in history:
        by_step.setdefault(h["step"], {}).update({f"{h['kind']}_{k}": v for k, v in h.items()})

    def fmt(v: Any, spec: str = ".4f") -> str:
        return "" if v is None else format(v, spec)

    for step, row in sorted(by_step.items()):
        cells = [fmt(row.get(f"validation_{c}")) for c in extra_cols]
        lines.append(
            f"| {step} | {fmt(row.get('train_loss'))} | {fmt(row.get('validation_loss'))} | "
            + " | ".join(cells)
            + f" | {fmt(row.get('train_tokens_per_s'), ',.0f')} |"
        )
    if metrics.get("best_step") is not None:
        lines += [
            "",
            f"Best validation {metrics['monitor']}: {metrics['best']:.4f} at step {metrics['best_step']}; "
            f"the exported model holds the weights of step {metrics['exported_step']}.",
        ]
    if val and val[-1].get("confusion") is not None and metrics.get("history"):
        names = [k.split("/", 1)[1] for k in val[-1] if k.startswith("precision/")]
        lines += [
            "",
            "Confusion matrix of the last validation (rows: true label, columns: predicted):",
            "",
            "| | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        lines += [
            f"| {n} | " + " | ".join(str(int(x)) for x in row) + " |" for n, row in zip(names, val[-1]["confusion"])
        ]
    if metrics.get("stopped"):
        lines += ["", f"Stopped early: {metrics['stopped']}"]
    lines += ["", f"![loss curve]({data_uri})", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
