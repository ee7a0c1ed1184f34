"""The stage table: every stage kind, declared once.

Each entry says what the kind is called, which class runs it, what it reads and what role it plays.
The pipeline config (flows/config.py) takes its sections from here, the planner (flows/plan.py) its
graph, `kiln stages` its listing and the Prefect layer its stage classes. Adding a stage is a folder
under tasks/ and one line below (docs/architecture.md walks through it).

`reads` names the inputs, in the order `process` receives them:

- `docs`  the current documents: the output of the last enabled `filter` before this entry, or else
          of every enabled `source` (their shards are read together);
- `NAME`  the section called NAME (by default; a section rewires a slot with `inputs: {NAME: other}`,
          and a stage may wire a slot from its own config, see Stage.bindings);
- `NAME?` the same, read when that section is enabled and skipped otherwise;
- `NAME*` any number of sections, listed in `inputs: {NAME: [a, b, ...]}`.

Roles: `source` (documents from outside the store), `filter` (documents in, documents out), `step`
(a phase configured by another kind's section: `configured_by`), and what the rest produce: `records`,
`tokenizer`, `tokens`, `dataset`, `model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.classify import ClassifyIngestStage, ClassifyTokenizeStage
from tasks.clean import CleanStage
from tasks.crawl import CrawlStage
from tasks.dedup import DedupCandidatesStage, DedupClustersStage, DedupStage, MinHashStage
from tasks.eval import EvalCompareStage, EvalStage
from tasks.ingest import IngestStage, SftIngestStage
from tasks.langid import LangIdStage
from tasks.openai import OpenAIExportStage, OpenAITrainStage
from tasks.pack import PackStage
from tasks.prefs import (
    GenerateStage,
    PairsStage,
    PrefIngestStage,
    PrefTokenizeStage,
    PromptsStage,
    ScoreStage,
)
from tasks.prefs.feedback import FeedbackStage
from tasks.prefs.loop import PreferenceLoopConfig, PrefReportStage, expand
from tasks.rl import RLStage
from tasks.stage import Stage, StageConfig
from tasks.tokenize import SftTokenizeStage, TokenizerStage, TokenizeStage
from tasks.train.stage import TrainStage


@dataclass(frozen=True)
class Kind:
    name: str
    stage: type[Stage]
    role: str
    reads: tuple[str, ...] = ()
    configured_by: str | None = None  # a phase of another kind's section (the dedup chain)
    summary: str = ""

    @property
    def has_section(self) -> bool:
        return self.configured_by is None


# One line a kind, in pipeline order (the planner's order where the graph leaves a choice).
# fmt: off
KINDS: tuple[Kind, ...] = (
    # documents
    Kind("crawl", CrawlStage, "source", (), summary="Crawl web sites, WARC files and source code trees into documents."),
    Kind("ingest", IngestStage, "source", (), summary="Read local files / datasets into documents."),
    Kind("clean", CleanStage, "filter", ("docs",), summary="Quality, repetition and length filters; normalisation."),
    Kind("minhash", MinHashStage, "step", ("docs",), configured_by="dedup"),
    Kind("dedup_candidates", DedupCandidatesStage, "step", ("minhash",), configured_by="dedup"),
    Kind("dedup_clusters", DedupClustersStage, "step", ("dedup_candidates", "docs"), configured_by="dedup"),
    Kind("dedup", DedupStage, "filter", ("docs", "dedup_clusters"), summary="Exact and MinHash near-duplicate removal."),
    Kind("langid", LangIdStage, "filter", ("docs",), summary="fastText language identification and filtering."),
    # token ids and datasets
    Kind("sft_ingest", SftIngestStage, "records", (), summary="Read instruction data (Alpaca / chat) into documents."),
    Kind("tokenizer", TokenizerStage, "tokenizer", ("docs?",), summary="Train a byte-level BPE on the documents, or load one."),
    Kind("tokenize", TokenizeStage, "tokens", ("docs", "tokenizer"), summary="Documents -> token ids."),
    Kind("sft_tokenize", SftTokenizeStage, "tokens", ("sft_ingest", "tokenizer"), summary="Instruction examples -> token ids, prompts masked."),
    Kind("pack", PackStage, "dataset", ("tokenize?", "sft_tokenize?"), summary="Token ids -> fixed-length training rows, train/validation split."),
    Kind("classify_ingest", ClassifyIngestStage, "records", (), summary="Read labelled records (text + label) for a classifier."),
    Kind("classify_tokenize", ClassifyTokenizeStage, "dataset", ("docs", "tokenizer"), summary="Labelled documents -> token ids and label ids, train/validation."),
    # preference data
    Kind("prompts", PromptsStage, "records", (), summary="Read prompts (instruction / chat records, a prompt field, one per line)."),
    Kind("pref_ingest", PrefIngestStage, "pairs", (), summary="Read preference datasets (prompt, chosen, rejected; UltraFeedback, HH)."),
    Kind("generate", GenerateStage, "candidates", ("prompts", "model?"), summary="Sample K candidate replies per prompt from a model."),
    Kind("score", ScoreStage, "candidates", ("candidates", "reward_model?"), summary="A reward per candidate: a reward model, a function or a rule."),
    Kind("pairs", PairsStage, "pairs", ("scored",), summary="Best against worst reply per prompt: preference pairs."),
    Kind("feedback", FeedbackStage, "pairs", ("candidates",), summary="People's (or a judge's) choices between two candidates -> preference pairs."),
    Kind("pref_tokenize", PrefTokenizeStage, "dataset", ("pairs", "tokenizer"), summary="Preference pairs -> token ids, prompt masked, train/validation."),
    Kind("pref_report", PrefReportStage, "report", ("scores*", "pairs*"), summary="Mean scores round by round, sample pairs."),
    # models
    Kind("train", TrainStage, "model", ("data", "tokenizer?", "model?"), summary="DeepSpeed training: causal LM, SFT, classification, SimPO, DPO."),
    Kind("rl", RLStage, "model", ("prompts", "policy?", "reward_model?"), summary="PPO / RLOO / REINFORCE of a policy against a reward model or function."),
    # fine-tuning through OpenAI's API
    Kind("openai_export", OpenAIExportStage, "dataset", ("data",), summary="Instruction examples or preference pairs -> OpenAI fine-tuning JSONL (chat / DPO), checked, with billed-token estimates."),
    Kind("openai_train", OpenAITrainStage, "model", ("data",), summary="Fine-tune a model through OpenAI's API on an openai_export artifact; follows the job."),
    # evaluation
    Kind("eval", EvalStage, "eval", ("model?", "data?", "instructions?", "reward_model?", "docs?"), summary="lm-evaluation-harness tasks, held-out perplexity, classifier and generation metrics, contamination: one model."),
    Kind("eval_compare", EvalCompareStage, "report", ("evals*",), summary="Evals side by side: a value per model and task, deltas against a baseline, a chart."),
)
# fmt: on


@dataclass(frozen=True)
class Macro:
    """A section kind that stands for several stages: its config expands into sections of stage kinds
    (the preference loop: `rounds` x generate -> score -> pairs -> pref_tokenize -> train)."""

    name: str
    Config: type[StageConfig]
    expand: Callable[[str, Any], list[tuple[str, str, StageConfig]]]
    summary: str = ""


MACROS: tuple[Macro, ...] = (
    Macro(
        "preference",
        PreferenceLoopConfig,
        expand,
        summary="The SimPO / DPO loop: rounds of generate, score, pairs, pref_tokenize, train, and a report.",
    ),
)
MACRO_BY_NAME: dict[str, Macro] = {m.name: m for m in MACROS}

KIND_BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}
SECTION_KINDS: tuple[Kind, ...] = tuple(k for k in KINDS if k.has_section)
_REGISTERED: dict[str, Stage] = {}


def kind(name: str) -> Kind:
    if name not in KIND_BY_NAME:
        raise KeyError(f"unknown stage kind {name!r}; kinds: {', '.join(KIND_BY_NAME)}")
    return KIND_BY_NAME[name]


def steps_of(section_kind: str) -> list[Kind]:
    """The kinds a section of `section_kind` runs, in order: its phases (configured_by), then itself."""
    return [k for k in KINDS if k.configured_by == section_kind] + [kind(section_kind)]


def register_stage(stage: Stage) -> Stage:
    """Make a stage defined outside Kiln runnable by name (`kiln stage`, Prefect unit tasks)."""
    _REGISTERED[stage.name] = stage
    return stage


def stage_registry() -> dict[str, Stage]:
    """Every stage that exists, by name: the table's, then any registered from outside."""
    return {**{k.name: k.stage() for k in KINDS}, **_REGISTERED}


def get_stage(name: str) -> Stage:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in KIND_BY_NAME:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(sorted(stage_registry()))}")
    return KIND_BY_NAME[name].stage()
