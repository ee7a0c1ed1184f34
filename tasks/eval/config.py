"""What an `eval` section says: the model, the tasks and their settings, the held-out measurements.

    eval_sft:
      kind: eval
      model_from: sft                       # a training section (or model_path: DIR / hub name)
      preset: open_llm_v1                   # HellaSwag 10-shot, Winogrande 5, TruthfulQA mc2 0, MMLU 5
      tasks: [examples/eval/hellaswag.yaml] # more lm_eval task names, or local task YAMLs
      perplexity: true                      # held-out perplexity / bits per byte on the packed validation split
      generation: {instructions_from: heldout, reward: {rule: {kind: length, max_chars: 400}}}
      decontamination: {}                   # 13-gram overlap of the training documents with the task items

Settings that change the numbers (tasks, shots, limit, dtype, the harness version) are part of the
fingerprint; settings that change only how fast they come (batch size, device) are not.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.prefs.score import RuleConfig
from tasks.stage import StageConfig


class Preset(BaseModel):
    """A published evaluation setting: which tasks, how many shots each, which metric each is judged by."""

    tasks: tuple[str, ...]
    num_fewshot: dict[str, int]
    metric: dict[str, str]
    source: str


# The Open LLM Leaderboard v1 (2023-24): the setting behind numbers such as "HellaSwag 79.59 %, Winogrande
# 70.17 %, TruthfulQA 48.88 %, MMLU 48.19 %". MMLU is the mean over its 57 subjects (lm_eval's `mmlu`
# group, weighted by subject size); TruthfulQA's mc2 score is lm_eval's `acc` of truthfulqa_mc2.
PRESETS: dict[str, Preset] = {
    "open_llm_v1": Preset(
        tasks=("hellaswag", "winogrande", "truthfulqa_mc2", "mmlu"),
        num_fewshot={"hellaswag": 10, "winogrande": 5, "truthfulqa_mc2": 0, "mmlu": 5},
        metric={"hellaswag": "acc_norm", "winogrande": "acc", "truthfulqa_mc2": "acc", "mmlu": "acc"},
        source="https://huggingface.co/spaces/open-llm-leaderboard-old/open_llm_leaderboard (About: 'Reproducibility')",
    ),
}


class RewardConfig(BaseModel):
    """Where the score of a generated reply comes from (exactly one), as in the score stage."""

    model_config = ConfigDict(extra="forbid")

    function: str | None = Field(None, description="A Python function `module:function(prompt, reply) -> float`.")
    rule: RuleConfig | None = Field(None, description="Or a built-in rule (contains, regex, length, char_fraction).")
    reward_from: str | None = Field(None, description="Or a training section whose reward model scores.")
    reward_model_path: str | None = Field(None, description="Or a reward model (one output) by local path.")
    template: Literal["auto", "chat", "alpaca"] = Field("auto", description="Reward model: how the prompt is rendered.")
    max_length: int = Field(1024, ge=8, description="Reward model: tokens read per reply (the start is cut).")

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        given = [n for n in ("function", "rule", "reward_from", "reward_model_path") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of function, rule, reward_from or reward_model_path"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class GenerationConfig(BaseModel):
    """Replies to held-out instructions, against their reference replies."""

    model_config = ConfigDict(extra="forbid")

    instructions_from: str = Field(
        ..., description="An sft_ingest section holding the held-out instructions with their reference replies."
    )
    max_new_tokens: int = Field(128, ge=1, le=1 << 16, description="A reply longer than this is cut.")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="How a prompt is rendered: the tokenizer's chat template, the Alpaca prompt, or auto."
    )
    reward: RewardConfig | None = Field(None, description="Score every reply; the mean is reported.")
    shown: int = Field(5, ge=0, le=100, description="Replies shown in the report beside their references.")


class DecontaminationConfig(BaseModel):
    """N-gram overlap between the training documents and the configured tasks' evaluation items."""

    model_config = ConfigDict(extra="forbid")

    documents_from: str | None = Field(
        None, description="The section whose documents are checked (default: the pipeline's current documents)."
    )
    ngram: int = Field(13, ge=3, le=64, description="Words per n-gram (13, as the GPT-3 and Llama reports).")


class EvalConfig(StageConfig):
    """One model, judged by benchmark tasks and held-out measurements; one unit per task."""

    execution_fields = StageConfig.execution_fields | {"batch_size", "device"}

    model_from: str | None = Field(None, description="A training section whose model is evaluated (its artifact).")
    model_path: str | None = Field(None, description="Or a local model directory / hub name (with internet).")
    label: str | None = Field(None, description="The model's name in reports (default: the section or path).")
    preset: Literal["open_llm_v1"] | None = Field(
        None, description="open_llm_v1: HellaSwag 10-shot acc_norm, Winogrande 5, TruthfulQA 0 mc2, MMLU 5."
    )
    tasks: list[str] = Field(
        [],
        description="lm-evaluation-harness task or group names (their data comes from the hub), or local task "
        "YAML files (a path ending in .yaml): one unit each.",
    )
    num_fewshot: int | dict[str, int] | None = Field(
        None, description="Shots for every task, or per task name; unset: the task's (or preset's) own."
    )
    metric: dict[str, str] = Field(
        {}, description="The metric a task is judged by, per task name (default: acc_norm, else acc, else the first)."
    )
    limit: int | None = Field(
        None, ge=1, description="At most this many examples per task and held-out set (quick looks; not comparable)."
    )
    bootstrap_iters: int = Field(
        0, ge=0, description="lm_eval's bootstrap for standard errors; 0 (off) leaves them out and saves minutes."
    )
    max_length: int | None = Field(None, ge=16, description="Tokens a harness request may use (default: the model's).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype: auto is float32 on the CPU, bfloat16 on a GPU."
    )
    perplexity: bool = Field(False, description="Held-out perplexity and bits per byte on the packed validation split.")
    classification: bool = Field(
        False, description="A classifier's accuracy, macro-F1, per-class precision / recall, confusion matrix."
    )
    data_from: str | None = Field(
        None, description="The dataset for perplexity / classification (default: pack / classify_tokenize)."
    )
    generation: GenerationConfig | None = Field(None, description="Replies to held-out instructions, scored.")
    decontamination: DecontaminationConfig | None = Field(
        None, description="Report n-gram overlap of the training documents with each task's items."
    )
    batch_size: int = Field(8, ge=1, description="Requests / rows / prompts run together.")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: a GPU when torch sees one.")

    @model_validator(mode="after")
    def _coherent(self) -> EvalConfig:
        if self.model_from is not None and self.model_path is not None:
            raise ValueError("set model_from (a training section) or model_path, not both")
        if self.perplexity and self.classification:
            raise ValueError("perplexity is for language models, classification for classifiers: one eval, one kind")
        if not (self.tasks or self.preset or self.perplexity or self.classification or self.generation):
            raise ValueError("nothing to evaluate: set tasks, a preset, perplexity, classification or generation")
        if self.decontamination is not None and not (self.tasks or self.preset):
            raise ValueError("decontamination compares documents with task items: set tasks or a preset")
        return self

    def task_specs(self) -> list[str]:
        """The configured tasks in order, the preset's first, each once."""
        specs = list(PRESETS[self.preset].tasks) if self.preset else []
        return list(dict.fromkeys(specs + list(self.tasks)))

    def shots_for(self, task: str) -> int | None:
        if isinstance(self.num_fewshot, int):
            return self.num_fewshot
        if isinstance(self.num_fewshot, dict) and task in self.num_fewshot:
            return self.num_fewshot[task]
        if self.preset:
            return PRESETS[self.preset].num_fewshot.get(task)
        return None

    def metric_for(self, task: str) -> str | None:
        if task in self.metric:
            return self.metric[task]
        if self.preset:
            return PRESETS[self.preset].metric.get(task)
        return None


class EvalCompareConfig(StageConfig):
    """Several evals side by side."""

    evals: list[str] = Field([], description="The eval sections compared, the first the baseline of the deltas.")
    baseline: str | None = Field(None, description="The model label deltas are taken against (default: the first).")
    all_metrics: bool = Field(False, description="Every metric, not only each task's headline metric.")
