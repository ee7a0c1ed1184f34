"""The preference loop as one section: `kind: preference` with `rounds: N` expands into the stages of N
rounds (generate -> score -> pairs -> pref_tokenize -> train), round r+1 generating with round r's
model, then fresh samples of the last model scored, and a report across the rounds.

    simpo:
      kind: preference
      rounds: 3
      policy: {from: sft}                 # a training section, or {name_or_path: DIR}
      generate: {samples: 4, temperature: 0.8, max_new_tokens: 64}
      score: {function: "rewards:helpfulness"}
      train: {objective: simpo, max_steps: 50, optim: {lr: 1.0e-5}}

Every step of every round is a section of its own (`simpo.r2.pairs`, ...) and so an artifact of its
own: a failed round resumes where it failed, and an unchanged round comes back from cache.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.artifacts import Artifact, ArtifactWriter
from tasks.prefs.generate import GenerateConfig
from tasks.prefs.pairs import PairsConfig
from tasks.prefs.score import ScoreConfig
from tasks.prefs.tokenize import PrefTokenizeConfig
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.train.config import ModelConfig, TrainConfig


class LoopPolicy(BaseModel):
    """The model the first round starts from."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str | None = Field(None, alias="from", description="A training section of this pipeline.")
    name_or_path: str | None = Field(None, description="Or a local model directory / hub name.")

    @model_validator(mode="after")
    def _one(self) -> LoopPolicy:
        if (self.from_ is None) == (self.name_or_path is None):
            raise ValueError("set exactly one of policy.from (a training section) or policy.name_or_path")
        return self


class LoopTrainConfig(TrainConfig):
    """A round's training settings: a TrainConfig whose model each round fills in."""

    model: ModelConfig | None = Field(None, description="Set by the loop: the previous round's model.")

    @model_validator(mode="after")
    def _preference_objective(self) -> LoopTrainConfig:
        if self.objective not in ("simpo", "dpo"):
            raise ValueError(f"objective: the preference loop trains with simpo or dpo, not {self.objective}")
        return self


class PreferenceLoopConfig(StageConfig):
    """N rounds of generate -> score -> pairs -> pref_tokenize -> train."""

    rounds: int = Field(..., ge=1, le=100, description="Rounds; round r+1 generates with round r's model.")
    policy: LoopPolicy
    prompts: str = Field("prompts", description="The section whose prompts every round answers.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    tokenize: PrefTokenizeConfig = Field(default_factory=PrefTokenizeConfig)
    train: LoopTrainConfig = Field(default_factory=lambda: LoopTrainConfig(objective="simpo"))
    final_samples: bool = Field(True, description="Also sample and score the last round's model (its mean score).")
    report_pairs: int = Field(3, ge=0, le=100, description="Sample pairs per round shown in the report.")

    @model_validator(mode="after")
    def _not_wired_inside(self) -> PreferenceLoopConfig:
        if self.generate.model_from or self.generate.model_path:
            raise ValueError(
                "generate: the loop chooses each round's model (set policy instead of model_from / model_path)"
            )
        return self


def expand(name: str, cfg: PreferenceLoopConfig) -> list[tuple[str, str, StageConfig]]:
    """The sections of the loop: (section name, kind, config), with their inputs wired."""
    out: list[tuple[str, str, StageConfig]] = []
    common = {"enabled": cfg.enabled, "retries": cfg.retries, "retry_delay_seconds": cfg.retry_delay_seconds}
    previous = cfg.policy.from_  # the section whose model the next generation uses (None: the path)
    path = cfg.policy.name_or_path
    scores, pairs, labels = [], [], []

    def sample(prefix: str, seed_offset: int) -> str:
        gen = cfg.generate.model_copy(
            update={
                **common,
                "kind": "generate",
                "model_from": previous,
                "model_path": None if previous else path,
                "seed": cfg.generate.seed + seed_offset,
                "inputs": {"prompts": cfg.prompts},
            }
        )
        score = cfg.score.model_copy(update={**common, "kind": "score", "inputs": {"candidates": f"{prefix}.generate"}})
        out.append((f"{prefix}.generate", "generate", gen))
        out.append((f"{prefix}.score", "score", score))
        scores.append(f"{prefix}.score")
        return f"{prefix}.score"

    for r in range(1, cfg.rounds + 1):
        prefix = f"{name}.r{r}"
        scored = sample(prefix, 1000 * r)
        labels.append(f"r{r}")
        out.append(
            (
                f"{prefix}.pairs",
                "pairs",
                cfg.pairs.model_copy(update={**common, "kind": "pairs", "inputs": {"scored": scored}}),
            )
        )
        pairs.append(f"{prefix}.pairs")
        tok_update: dict[str, Any] = {**common, "kind": "pref_tokenize", "inputs": {"pairs": f"{prefix}.pairs"}}
        if previous:
            tok_update["inputs"]["tokenizer"] = previous  # the policy's own tokenizer, from its export
            tok_update["tokenizer"] = None
        elif not cfg.tokenize.tokenizer:
            tok_update["tokenizer"] = path
            tok_update["inputs"]["tokenizer"] = None
        out.append((f"{prefix}.tokenize", "pref_tokenize", cfg.tokenize.model_copy(update=tok_update)))
        model = {"from": previous} if previous else {"name_or_path": path}
        train = TrainConfig.model_validate(
            {
                **cfg.train.model_dump(exclude={"model", "kind", "inputs"}),
                **common,
                "kind": "train",
                "model": model,
                "inputs": {"data": f"{prefix}.tokenize", "tokenizer": None},
            }
        )
        out.append((f"{prefix}.train", "train", train))
        previous = f"{prefix}.train"
    if cfg.final_samples:
        sample(f"{name}.final", 1000 * (cfg.rounds + 1))
        labels.append("final")
    report = PrefReportConfig(
        **common,
        kind="pref_report",
        labels=labels,
        pairs_shown=cfg.report_pairs,
        inputs={"scores": scores, "pairs": pairs},
    )
    out.append((f"{name}.report", "pref_report", report))
    return out


# --------------------------------------------------------------------------------------------------
# the report across rounds


class PrefReportConfig(StageConfig):
    labels: list[str] = Field(..., description="A label per scores input (r1, r2, ..., final).")
    pairs_shown: int = Field(3, ge=0, description="Sample pairs per round in the report.")


ROUNDS_SCHEMA = pa.schema(
    [
        ("round", pa.string()),
        ("mean_score", pa.float64()),
        ("candidates", pa.int64()),
        ("finished_eos", pa.int64()),
        ("pairs", pa.int64()),
    ]
)
SAMPLES_SCHEMA = pa.schema(
    [
        ("round", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("chosen_score", pa.float64()),
        ("rejected", pa.string()),
        ("rejected_score", pa.float64()),
    ]
)


class PrefReportStage(Stage):
    """The mean score of fresh samples round by round (a table, a plot) and sample pairs with their scores."""

    name = "pref_report"
    version = 1
    Config = PrefReportConfig
    report_tables = ("rounds",)
    report_table_descriptions = {"rounds": "the mean score of fresh samples, one row per round"}

    def plan(self, inputs: list[Artifact], cfg: PrefReportConfig) -> list[dict[str, Any]]:
        if len([a for a in inputs if a.slot == "scores"]) != len(cfg.labels):
            raise StageInputError("labels", "one label per scores input")
        return [{"report": 0}]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: PrefReportConfig, out: ArtifactWriter) -> None:
        scores = [a for a in inputs if a.slot == "scores"]
        pairs = [a for a in inputs if a.slot == "pairs"]
        rounds, samples = [], []
        for i, (label, art) in enumerate(zip(cfg.labels, scores)):
            s = art.manifest.get("scores") or {}
            n_pairs = pairs[i].num_rows if i < len(pairs) else None
            rounds.append(
                {
                    "round": label,
                    "mean_score": s.get("mean"),
                    "candidates": s.get("candidates"),
                    "finished_eos": s.get("finished_eos"),
                    "pairs": n_pairs,
                }
            )
            if i < len(pairs) and cfg.pairs_shown:
                for row in pairs[i].head(cfg.pairs_shown):
                    prompt = json.loads(row["prompt"])[-1]["content"]
                    samples.append(
                        {
                            "round": label,
                            "prompt": prompt,
                            "chosen": row["chosen"],
                            "chosen_score": row["chosen_score"],
                            "rejected": row["rejected"],
                            "rejected_score": row["rejected_score"],
                        }
                    )
        out.stats.rows_in = len(scores)
        out.table("rounds").write(pa.Table.from_pylist(rounds, schema=ROUNDS_SCHEMA))
        out.write(pa.Table.from_pylist(samples, schema=SAMPLES_SCHEMA) if samples else None)
        means = [r["mean_score"] for r in rounds if r["mean_score"] is not None]
        if means:
            out.stats.extra.update(first_mean_score=means[0], last_mean_score=means[-1])

    def finalize(self, inputs: list[Artifact], cfg: PrefReportConfig, directory: str, fs: Any) -> dict[str, Any]:
        import pyarrow.parquet as pq

        base = directory.rstrip("/")
        rounds = []
        for shard in sorted(fs.glob(f"{base}/rounds/part-*.parquet")):
            with fs.open(shard, "rb") as f:
                rounds += pq.read_table(f).to_pylist()
        samples = []
        for shard in sorted(fs.glob(f"{base}/part-*.parquet")):
            with fs.open(shard, "rb") as f:
                samples += pq.read_table(f).to_pylist()
        with fs.open(f"{base}/report.md", "w") as f:
            f.write(_markdown(rounds, samples))
        return {"rounds": rounds}


def _markdown(rounds: list[dict[str, Any]], samples: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Preference loop: the mean score of fresh samples, round by round",
        "",
        "| round | mean score | candidates | ended at EOS | pairs |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rounds:
        mean = "" if r["mean_score"] is None else f"{r['mean_score']:.4f}"
        lines.append(
            f"| {r['round']} | {mean} | {r['candidates']} | {r['finished_eos']} | "
            f"{'' if r['pairs'] is None else r['pairs']} |"
        )
    points = [(r["round"], r["mean_score"]) for r in rounds if r["mean_score"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel("round (samples from the model that round starts with; final: the last model)")
        ax.set_ylabel("mean score")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        lines += ["", f"![mean score by round](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"]
    if samples:
        lines += [
            "",
            "## Sample pairs",
            "",
            "| round | prompt | chosen (score) | rejected (score) |",
            "|---|---|---|---|",
        ]
        for s in samples:

            def cell(text: str) -> str:
                return " ".join(str(text).split())[:120].replace("|", "\\|")

            lines.append(
                f"| {s['round']} | {cell(s['prompt'])} | {cell(s['chosen'])} ({s['chosen_score']:.3f}) | "
                f"{cell(s['rejected'])} ({s['rejected_score']:.3f}) |"
            )
    return "\n".join(lines) + "\n"
