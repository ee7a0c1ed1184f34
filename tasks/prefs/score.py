"""score: a reward for every candidate reply.

The reward comes from exactly one of:
- a reward model: a training run's artifact (objective `reward`, slot `reward_model`, wired by
  `reward_from`) or any Hugging Face sequence-classification model with one output (`reward_model_path`),
  run batched without gradients on the prompt rendered with the reward model's own tokenizer and the reply;
- a Python function `module:function(prompt, reply) -> float` (`function`); the prompt is the list of
  chat turns, the reply the text;
- a built-in rule (`rule`): `contains` (1 if the reply contains any of `words`), `regex` (the number of
  matches of `pattern`, or 1/0 with `count: false`), `length` (1 inside [min_chars, max_chars], falling
  off linearly outside), `char_fraction` (the share of the reply's characters that are in `chars`).

What decides the scores is part of the fingerprint: the reward model's fingerprint or files, the
function's module source, the rule's settings. A reward model that does not load or has no single
output, or a function that cannot be imported, fails the pipeline before anything runs, naming the
field. A function that raises or returns NaN for one candidate rejects that candidate, with the reason.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os
import re
import sys
import threading
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.artifacts import Artifact, ArtifactWriter, pick, read_unit
from tasks.prefs.schema import SCORED_SCHEMA, load_messages
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.tokenize.hf import local_model_directory

_MODELS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


class RuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["contains", "regex", "length", "char_fraction"]
    words: list[str] = Field([], description="contains: any of these words (case-insensitive).")
    pattern: str | None = Field(None, description="regex: a Python regular expression.")
    count: bool = Field(True, description="regex: the number of matches (else 1 for a match, 0 for none).")
    min_chars: int = Field(0, ge=0, description="length: the shortest reply that scores 1.")
    max_chars: int = Field(1_000_000, ge=1, description="length: the longest reply that scores 1.")
    chars: str = Field("", description="char_fraction: the characters counted.")

    @model_validator(mode="after")
    def _complete(self) -> RuleConfig:
        if self.kind == "contains" and not self.words:
            raise ValueError("rule.words: contains needs at least one word")
        if self.kind == "regex":
            if not self.pattern:
                raise ValueError("rule.pattern: regex needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"rule.pattern: not a regular expression: {e}") from None
        if self.kind == "char_fraction" and not self.chars:
            raise ValueError("rule.chars: char_fraction needs the characters to count")
        if self.min_chars > self.max_chars:
            raise ValueError("rule: min_chars is above max_chars")
        return self

    def __call__(self, prompt: list[dict[str, str]], reply: str) -> float:
        if self.kind == "contains":
            low = reply.lower()
            return float(any(w.lower() in low for w in self.words))
        if self.kind == "regex":
            n = len(re.findall(self.pattern, reply))
            return float(n if self.count else n > 0)
        if self.kind == "char_fraction":
            return sum(c in self.chars for c in reply) / len(reply) if reply else 0.0
        n = len(reply)
        if n < self.min_chars:
            return n / self.min_chars
        if n > self.max_chars:
            return max(0.0, 1.0 - (n - self.max_chars) / self.max_chars)
        return 1.0


class ScoreConfig(StageConfig):
    """Where the reward comes from (exactly one)."""

    execution_fields = StageConfig.execution_fields | {"batch_size", "device"}

    reward_from: str | None = Field(None, description="A training section (objective: reward) whose model scores.")
    reward_model_path: str | None = Field(
        None, description="Or a sequence-classification model with one output, by local path (or hub name)."
    )
    function: str | None = Field(None, description="Or a Python function `module:function(prompt, reply) -> float`.")
    rule: RuleConfig | None = Field(None, description="Or a built-in rule.")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="Reward model: how the prompt is rendered with its tokenizer."
    )
    max_length: int = Field(1024, ge=8, description="Reward model: tokens read per candidate (the end is cut).")
    batch_size: int = Field(32, ge=1, description="Reward model: candidates scored together.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Reward model: auto uses a GPU if torch sees one."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ScoreConfig:
        given = [n for n in ("reward_from", "reward_model_path", "function", "rule") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of reward_from, reward_model_path, function or rule"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


def load_function(spec: str) -> Any:
    """`module:function` imported; StageInputError naming `function` if it cannot be."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise StageInputError("function", f"{spec!r}: want module:function, e.g. mypkg.rewards:helpfulness")
    if os.getcwd() not in sys.path:  # `mypkg.rewards` beside the config, as `python -m` would find it
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time error is the user's to see, named
        raise StageInputError("function", f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise StageInputError("function", f"{module_name!r} has no function {attr!r}")
    return fn


def function_identity(spec: str) -> dict[str, Any]:
    """What a reward function's results depend on: its name and its module's source."""
    fn = load_function(spec)
    module = inspect.getmodule(fn)
    try:
        source = inspect.getsource(module) if module else inspect.getsource(fn)
    except (OSError, TypeError):
        source = repr(fn)
    return {"function": spec, "source_sha256": hashlib.sha256(source.encode()).hexdigest()}


def check_reward_model(path: str, field: str) -> None:
    """A reward model must load as a sequence classifier with one output: checked on its config
    (no weights read), before any stage runs."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise StageInputError(field, f"cannot load a model config from {path!r}: {type(e).__name__}: {e}") from None
    if getattr(config, "num_labels", None) != 1:
        raise StageInputError(
            field,
            f"{path!r} is not a reward model: its head has {config.num_labels} outputs, "
            "a reward model has one (a scalar)",
        )


def load_reward_model(path: str, device: str) -> tuple[Any, Any]:
    import torch

    from tasks.tokenize.hf import from_transformers

    AutoModelForSequenceClassification, AutoTokenizer = from_transformers(
        "AutoModelForSequenceClassification", "AutoTokenizer"
    )
    dev = "cuda" if device == "gpu" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    key = (os.path.abspath(path) if os.path.isdir(path) else path, dev)
    with _LOCK:
        if key not in _MODELS:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path).to(dev).eval()
            if model.config.num_labels != 1:
                raise StageInputError("reward_model", f"{path} has {model.config.num_labels} outputs, not one")
            if len(_MODELS) > 4:
                _MODELS.clear()
            _MODELS[key] = (model, tok)
        return _MODELS[key]


def reward_model_scores(
    model: Any,
    tok: Any,
    prompts: list[list[dict[str, str]]],
    replies: list[str],
    template: str,
    max_length: int,
    batch_size: int,
) -> list[float]:
    """One scalar per (prompt, reply): the prompt rendered with the reward model's tokenizer, the reply and
    EOS after it, right-padded, the head's output at the last real token."""
    import torch

    from tasks.tokenize.sft import render_prompt

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.truncation_side = "left"  # keep the reply: the start of a long prompt matters least
    texts = [render_prompt(p, tok, template) + r + (tok.eos_token or "") for p, r in zip(prompts, replies)]
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        enc = tok(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        ).to(model.device)
        with torch.no_grad():
            scores += model(**enc).logits[:, 0].float().tolist()
    return scores


class ScoreStage(Stage):
    name = "score"
    version = 1
    Config = ScoreConfig
    balanced = True
    splittable = True

    def bindings(self, cfg: ScoreConfig) -> dict[str, str | None]:
        return {"candidates": "generate", "reward_model": cfg.reward_from}

    def sources(self, cfg: ScoreConfig) -> Any:
        from tasks.train.model import model_identity

        if cfg.function is not None:
            return function_identity(cfg.function)
        if cfg.reward_model_path is not None:
            check_reward_model(cfg.reward_model_path, "reward_model_path")
            return {"reward_model": model_identity(cfg.reward_model_path) or cfg.reward_model_path}
        return None

    def plan(self, inputs: list[Artifact], cfg: ScoreConfig) -> list[dict[str, Any]]:
        candidates = pick(inputs, "candidates", ("generate",))
        if candidates is None:
            raise StageInputError("inputs", "score reads candidates: the generate stage's output")
        rm = pick(inputs, "reward_model", ("train",))
        if cfg.reward_from is not None:
            if rm is None:
                raise StageInputError("reward_from", f"no reward model artifact from {cfg.reward_from!r}")
            check_reward_model(local_model_directory(rm.path), "reward_from")
        i = inputs.index(candidates)
        return [{"input": i, "shard": s} for s in range(len(candidates.shards()))]

    def scorer(self, inputs: list[Artifact], cfg: ScoreConfig) -> Any:
        """A function (prompts, replies) -> list of (score or an exception) for a batch."""
        if cfg.rule is not None or cfg.function is not None:
            fn = cfg.rule if cfg.rule is not None else load_function(cfg.function)

            def each(prompts: list, replies: list) -> list:
                out = []
                for p, r in zip(prompts, replies):
                    try:
                        out.append(float(fn(p, r)))
                    except Exception as e:  # one candidate's failure is that candidate's reject
                        out.append(e)
                return out

            return each
        rm = pick(inputs, "reward_model", ("train",))
        path = local_model_directory(rm.path) if rm is not None else cfg.reward_model_path
        model, tok = load_reward_model(path, cfg.device)
        return lambda prompts, replies: reward_model_scores(
            model, tok, prompts, replies, cfg.template, cfg.max_length, cfg.batch_size
        )

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: ScoreConfig, out: ArtifactWriter) -> None:
        score = self.scorer(inputs, cfg)
        for batch in read_unit(inputs[unit["input"]], unit, batch_rows=256, stats=out.stats):
            rows = batch.to_pylist()
            values = score([load_messages(r["prompt"]) for r in rows], [r["reply"] for r in rows])
            kept = []
            for row, value in zip(rows, values):
                if isinstance(value, Exception):
                    out.reject(
                        "reward_error",
                        f"{type(value).__name__}: {value}",
                        id=row["id"],
                        text=row["reply"],
                        meta=row["prompt"],
                    )
                elif not math.isfinite(value):
                    out.reject(
                        "reward_not_finite",
                        f"the reward is {value}",
                        id=row["id"],
                        text=row["reply"],
                        meta=row["prompt"],
                    )
                else:
                    kept.append({**row, "score": value})
            if kept:
                out.write(pa.RecordBatch.from_pylist(kept, schema=SCORED_SCHEMA))
                out.count("score_sum", sum(r["score"] for r in kept))

    def finalize(self, inputs: list[Artifact], cfg: ScoreConfig, directory: str, fs: Any) -> dict[str, Any]:
        """The mean score of the candidates (what a round of preference training is judged by)."""
        import pyarrow.parquet as pq

        total, n, finished = 0.0, 0, 0
        for shard in sorted(fs.glob(f"{directory.rstrip('/')}/part-*.parquet")):
            with fs.open(shard, "rb") as f:
                t = pq.read_table(f, columns=["score", "finished"])
            total += sum(t.column("score").to_pylist())
            finished += sum(v == "eos" for v in t.column("finished").to_pylist())
            n += t.num_rows
        return {"scores": {"mean": total / n if n else None, "candidates": n, "finished_eos": finished}}
