"""The `hpo:` section of a pipeline config: what a study searches, how, for how long, judged by what.

    hpo:
      params:                                   # dotted paths into this pipeline's config
        train.optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        train.micro_batch_size: {choices: [4, 8, 16]}
        train.max_steps: {low: 40, high: 120, step: 40}
        train.model.dropout.hidden: {low: 0.0, high: 0.3}
      sampler: tpe                              # tpe | random | grid
      n_trials: 20
      timeout_minutes: 120
      objective: {section: train, metric: loss} # or an eval section's: {section: eval, metric: hellaswag/acc_norm}
      pruner: {kind: median}

A searched value must change a fingerprint the objective depends on: the paths, ranges and the values at
both ends of every range are checked against the pipeline before any trial runs (flows/hpo/space.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamRange(_Section):
    """One searched field: a range (`low`, `high`, optionally `log` or `step`) or a list of `choices`."""

    type: Literal["float", "int", "categorical"] | None = Field(
        None, description="Default: categorical with `choices`, else the field's own type (int or float)."
    )
    low: float | None = Field(None, description="Smallest value (inclusive).")
    high: float | None = Field(None, description="Largest value (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (low > 0): learning rates, weight decay.")
    step: float | None = Field(None, gt=0, description="Only multiples of step above low (a grid needs it for floats).")
    choices: list[Any] | None = Field(None, description="The values to choose from (numbers, strings, booleans).")

    @model_validator(mode="after")
    def _a_range_or_choices(self) -> ParamRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or a range (low, high, log, step), not both")
            if not self.choices:
                raise ValueError("empty range: choices is an empty list")
            if len({repr(c) for c in self.choices}) < len(self.choices):
                raise ValueError(f"choices repeat a value: {self.choices}")
            if len(self.choices) == 1:
                raise ValueError(f"the range holds one value ({self.choices[0]!r}): set it in the config instead")
            if self.type not in (None, "categorical"):
                raise ValueError(f"type {self.type} takes low and high; choices are categorical")
            return self
        if self.type == "categorical":
            raise ValueError("type categorical needs choices")
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range), or choices")
        if self.low > self.high:
            raise ValueError(f"empty range: low {self.low:g} is above high {self.high:g}")
        if self.low == self.high:
            raise ValueError(f"the range holds one value ({self.low:g}): set it in the config instead")
        if self.log and self.low <= 0:
            raise ValueError(f"log: a log range needs low > 0 (low is {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.step is not None and self.step > self.high - self.low:
            raise ValueError(f"empty range: step {self.step:g} is wider than high - low ({self.high - self.low:g})")
        return self


class ObjectiveConfig(_Section):
    """What a trial is judged by."""

    section: str | None = Field(
        None,
        description="A training section (its best validation value of `metric` over the run) or an eval section "
        "(one of its metrics). Default: the pipeline's only training section.",
    )
    metric: str = Field(
        "loss",
        description="Training: a validation metric (loss, perplexity, accuracy, f1, ...). Eval: TASK/METRIC "
        "(hellaswag/acc_norm, perplexity/bits_per_byte) or TASK (its headline metric).",
    )
    direction: Literal["auto", "minimize", "maximize"] = Field(
        "auto", description="auto: minimise losses, perplexity and bits per byte; maximise the rest."
    )


class PrunerConfig(_Section):
    """When a trial stops early: its training run's validation values as they stream, against the other
    trials' at the same step. A pruned run's ranks are stopped; nothing of it is committed."""

    kind: Literal["none", "median", "percentile", "hyperband", "threshold"] = Field(
        "median",
        description="median: worse than the median of earlier trials at the same step. percentile: worse than "
        "`percentile`. hyperband: successive halving over brackets. threshold: outside [lower, upper].",
    )
    startup_trials: int = Field(2, ge=0, description="median / percentile: finished trials before any pruning.")
    warmup_steps: int = Field(0, ge=0, description="median / percentile: training steps before a trial may stop.")
    percentile: float = Field(25.0, gt=0, lt=100, description="percentile: the share of best trials kept.")
    lower: float | None = Field(None, description="threshold: prune below this (as the study sees values).")
    upper: float | None = Field(None, description="threshold: prune above this (as the study sees values).")

    @model_validator(mode="after")
    def _bounds(self) -> PrunerConfig:
        if self.kind == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("threshold: give lower, upper or both")
        return self


class HPOConfig(_Section):
    """An Optuna study over this pipeline's config (`kiln hpo CONFIG`, or the `kiln-hpo` deployment)."""

    study: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The study's name (default: the pipeline's)."
    )
    params: dict[str, ParamRange] = Field(
        ..., min_length=1, description="The search space: a dotted path into this config -> its range."
    )
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe",
        description="tpe: Bayesian (Tree-structured Parzen Estimator). random. grid: every combination of "
        "choices, int ranges and stepped float ranges, in a seeded order.",
    )
    seed: int = Field(0, description="The sampler's seed: the same seed and results give the same trials.")
    startup_trials: int = Field(4, ge=1, description="tpe: random trials before the model takes over.")
    n_trials: int = Field(20, ge=1, description="Trials that finish (complete or pruned) before the study ends.")
    timeout_minutes: float | None = Field(
        None, gt=0, description="Start no trial after this long (per invocation; a resumed study gets it again)."
    )
    parallel: int = Field(
        1,
        ge=1,
        description="Trials at once on this machine; the devices (GPUs, or CPU cores) are split between them. "
        "More machines: run the kiln-hpo deployment on each, with a shared `storage` and store.",
    )
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    storage: str | None = Field(
        None,
        description="Where the study lives. Default: SQLite in the study's directory (one machine). `server`: "
        "a database `optuna` on Kiln's server PostgreSQL (flows.server.shared_database_url; set "
        "KILN_SERVER_DATABASE_URL or KILN_SERVER_DIR as for `kiln server`). Or any SQLAlchemy URL.",
    )
    directory: str = Field(
        ".kiln/hpo", description="Outputs go to DIRECTORY/STUDY/: study.db, trials.parquet, best.yaml, plots/."
    )
    retries: int = Field(
        2,
        ge=0,
        description="A trial whose process died or was interrupted runs again (its training resumes from its "
        "checkpoints) up to this many times. A trial that fails on its own is not retried.",
    )
    heartbeat_seconds: int = Field(
        60, ge=1, description="A running trial's heartbeat; one silent for 3 beats (its machine died) is retried."
    )
