"""feedback: people's (or a stand-in judge's) preferences between two candidate replies -> preference pairs.

The pairs offered are fixed by the candidates (a generate or score artifact): for each prompt, its first
`pairs_per_prompt` pairs of candidates whose replies differ (a pair of identical replies is never shown),
in sample order; a pair's id is `<prompt id>:<sample a>-<sample b>`. Answers are A, B, tie or skip,
from three places, all optional:
- the Prefect UI: the `kiln-label` flow (flows/label.py) shows each unanswered pair and waits for the
  answer, appending it to the `journal` file as it arrives (annotator `ui`), so a killed labelling run
  loses nothing and its rerun asks only the rest;
- answer files from an external annotation tool (`answers`: JSONL or CSV with pair_id, choice, and
  optionally annotator, note), after `kiln feedback-export` wrote the pairs to label;
- a judge (`judge`: a function or rule scoring each reply; the higher score wins, equal scores tie):
  simulated preferences, for tests and demos, and recorded as such.

Several answers to a pair are a vote: the majority of A against B decides; a pair with no answer, only
skips, a majority of ties, or an even split is a reject with the reason (`unanswered`, `skipped`,
`tie`, `no_majority`). The manifest reports how often annotators agreed. An answer line that names no
offered pair or an unknown choice is counted and listed in the `bad_answers` table, never dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks import journal
from tasks.artifacts import Artifact, ArtifactWriter, pick
from tasks.prefs.schema import PAIRS_SCHEMA, load_messages
from tasks.prefs.score import RuleConfig, load_function
from tasks.stage import Stage, StageConfig, StageInputError

CHOICES = ("A", "B", "tie", "skip")
VOTES_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("annotator", pa.string()),
        ("choice", pa.string()),
        ("note", pa.string()),
        ("origin", pa.string()),
    ]
)
BAD_ANSWERS_SCHEMA = pa.schema(
    [("origin", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("detail", pa.string())]
)


class JudgeConfig(BaseModel):
    """A programmatic judge standing in for people: the reply with the higher score is preferred."""

    model_config = ConfigDict(extra="forbid")

    function: str | None = Field(None, description="`module:function(prompt, reply) -> float`.")
    rule: RuleConfig | None = None
    annotators: int = Field(1, ge=1, le=15, description="How many (identical) simulated annotators vote.")

    @model_validator(mode="after")
    def _one(self) -> JudgeConfig:
        if (self.function is None) == (self.rule is None):
            raise ValueError("judge: set exactly one of function or rule")
        return self

    def score(self, prompt: list[dict[str, str]], reply: str) -> float:
        return float((self.rule or load_function(self.function))(prompt, reply))


class FeedbackConfig(StageConfig):
    """Which candidates are offered as pairs, and where the answers come from."""

    execution_fields = StageConfig.execution_fields | {"journal"}

    candidates_from: str = Field("generate", description="The generate (or score) section whose candidates are paired.")
    pairs_per_prompt: int = Field(1, ge=1, le=100, description="Pairs offered per prompt.")
    limit: int | None = Field(None, ge=1, description="Offer at most this many pairs (the first ones).")
    ui: bool = Field(True, description="Use the answers given in the Prefect UI (the kiln-label flow's journal).")
    journal: str = Field(
        ".kiln/feedback.jsonl",
        description="Where the kiln-label flow keeps the answers given in "
        "the UI (one JSON line an answer; answers to other candidates are kept apart by their "
        "fingerprint). The answers for this section's candidates are part of its fingerprint.",
    )
    answers: list[str] = Field([], description="Answer files (JSONL / CSV: pair_id, choice[, annotator, note]).")
    judge: JudgeConfig | None = Field(None, description="Simulated preferences from a programmatic judge.")
    min_votes: int = Field(1, ge=1, description="A pair needs at least this many A/B/tie votes to count.")


def offered_pairs(candidates: Artifact, cfg: FeedbackConfig) -> list[dict[str, Any]]:
    """The pairs to label, in a fixed order: (pair_id, prompt_id, prompt, reply_a, reply_b)."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in candidates.read_table(columns=["prompt_id", "sample", "prompt", "reply"]).to_pylist():
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    pairs = []
    for prompt_id in sorted(by_prompt):
        group = sorted(by_prompt[prompt_id], key=lambda r: r["sample"])
        made = 0
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if made >= cfg.pairs_per_prompt:
                    break
                if a["reply"].strip() == b["reply"].strip():
                    continue  # identical replies: nothing to choose between
                pairs.append(
                    {
                        "pair_id": f"{prompt_id}:{a['sample']}-{b['sample']}",
                        "prompt_id": prompt_id,
                        "prompt": a["prompt"],
                        "reply_a": a["reply"],
                        "reply_b": b["reply"],
                    }
                )
                made += 1
    return pairs[: cfg.limit] if cfg.limit else pairs


def read_journal(path: str, candidates_fp: str) -> list[dict[str, Any]]:
    """The UI answers recorded so far for these candidates (a line cut by a kill is ignored: it was never
    acknowledged)."""
    return [record for record in journal.read(path) if record.get("candidates") == candidates_fp]


def append_answer(path: str, answer: dict[str, Any]) -> None:
    """One answer, on disk before the next pair is shown (fsynced)."""
    journal.append(path, answer, sync=True)


def read_answer_file(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of an external tool's answers: JSONL, or CSV with a header."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.lower().endswith((".csv", ".tsv")):
            reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            rows = [(i + 2, dict(r)) for i, r in enumerate(reader)]
        else:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((i, json.loads(line)))
                    except json.JSONDecodeError as e:
                        rows.append((i, {"_error": str(e)}))
    return rows


def file_identity(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {"path": os.path.abspath(path), "sha256": hashlib.sha256(f.read()).hexdigest()}


class FeedbackStage(Stage):
    name = "feedback"
    version = 1
    Config = FeedbackConfig

    def fingerprint(self, cfg: FeedbackConfig, input_fingerprints: list[str]) -> str:
        """The answers given so far for these candidates are part of what the artifact is: an answer more,
        a new artifact (the earlier one stays, like any artifact)."""
        from tasks.artifacts import fingerprint

        sources = self.sources(cfg)
        if cfg.ui and input_fingerprints:
            answers = read_journal(cfg.journal, input_fingerprints[0])
            sources["ui_answers"] = hashlib.sha256(json.dumps(answers, sort_keys=True).encode()).hexdigest()
        return fingerprint(self.name, self.version, cfg.fingerprint_config(), input_fingerprints, sources)

    def bindings(self, cfg: FeedbackConfig) -> dict[str, str | None]:
        return {"candidates": cfg.candidates_from}

    def sources(self, cfg: FeedbackConfig) -> Any:
        for i, path in enumerate(cfg.answers):
            if not os.path.isfile(path):
                raise StageInputError(f"answers[{i}]", f"no such answer file: {path!r}")
        identity: dict[str, Any] = {"answers": [file_identity(p) for p in cfg.answers]}
        if cfg.judge and cfg.judge.function:
            from tasks.prefs.score import ScoreConfig, ScoreStage

            identity["judge"] = ScoreStage().sources(ScoreConfig(function=cfg.judge.function))
        return identity

    def plan(self, inputs: list[Artifact], cfg: FeedbackConfig) -> list[dict[str, Any]]:
        if pick(inputs, "candidates", ("generate", "score")) is None:
            raise StageInputError("candidates_from", "feedback pairs the candidates of a generate (or score) stage")
        return [{"all": True}]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: FeedbackConfig, out: ArtifactWriter) -> None:
        candidates = pick(inputs, "candidates", ("generate", "score"))
        pairs = offered_pairs(candidates, cfg)
        offered = {p["pair_id"]: p for p in pairs}
        votes: list[dict[str, Any]] = []
        bad: list[dict[str, Any]] = []
        if cfg.ui:
            for i, a in enumerate(read_journal(cfg.journal, candidates.fingerprint), 1):
                self._vote(a, "ui", i, offered, votes, bad, default_annotator="ui")
        for path in cfg.answers:
            for line, record in read_answer_file(path):
                self._vote(record, path, line, offered, votes, bad, default_annotator=os.path.basename(path))
        if cfg.judge is not None:
            for p in pairs:
                prompt = load_messages(p["prompt"])
                a, b = cfg.judge.score(prompt, p["reply_a"]), cfg.judge.score(prompt, p["reply_b"])
                choice = "A" if a > b else "B" if b > a else "tie"
                for k in range(cfg.judge.annotators):
                    votes.append(
                        {
                            "pair_id": p["pair_id"],
                            "annotator": f"judge-{k}",
                            "choice": choice,
                            "note": f"simulated: scores {a:.4g} / {b:.4g}",
                            "origin": "judge",
                        }
                    )
        out.table("votes").write(pa.Table.from_pylist(votes, schema=VOTES_SCHEMA) if votes else None)
        if bad:
            out.table("bad_answers").write(pa.Table.from_pylist(bad, schema=BAD_ANSWERS_SCHEMA))
            out.count("bad_answers", len(bad))
        by_pair: dict[str, list[dict[str, Any]]] = {}
        for v in votes:
            by_pair.setdefault(v["pair_id"], []).append(v)
        rows, unanimous, multi = [], 0, 0
        for p in pairs:
            out.stats.rows_in += 1
            pv = by_pair.get(p["pair_id"], [])
            tally = Counter(v["choice"] for v in pv)
            counted = tally["A"] + tally["B"] + tally["tie"]
            if counted >= 2:
                multi += 1
                unanimous += max(tally["A"], tally["B"], tally["tie"]) == counted
            verdict = None
            if not pv:
                verdict = ("unanswered", "no answer yet")
            elif counted == 0:
                verdict = ("skipped", f"{tally['skip']} skip(s)")
            elif counted < cfg.min_votes:
                verdict = ("too_few_votes", f"{counted} vote(s) < min_votes {cfg.min_votes}")
            elif tally["tie"] > max(tally["A"], tally["B"]):
                verdict = ("tie", f"votes {dict(tally)}")
            elif tally["A"] == tally["B"]:
                verdict = ("no_majority", f"votes {dict(tally)}")
            if verdict:
                out.reject(
                    *verdict,
                    id=p["pair_id"],
                    meta=p["prompt"],
                    text=json.dumps([p["reply_a"], p["reply_b"]], ensure_ascii=False),
                )
                continue
            a_wins = tally["A"] > tally["B"]
            rows.append(
                {
                    "id": p["pair_id"],
                    "prompt": p["prompt"],
                    "chosen": p["reply_a"] if a_wins else p["reply_b"],
                    "rejected": p["reply_b"] if a_wins else p["reply_a"],
                    "chosen_score": None,
                    "rejected_score": None,
                    "source": candidates.fingerprint,
                    "meta": json.dumps(
                        {
                            "votes": dict(tally),
                            "annotators": sorted({v["annotator"] for v in pv}),
                            "simulated": all(v["origin"] == "judge" for v in pv),
                        },
                        sort_keys=True,
                    ),
                }
            )
        if rows:
            out.write(pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA))
        out.stats.extra.update(
            pairs_offered=len(pairs),
            votes=len(votes),
            pairs_with_several_votes=multi,
            agreement=round(unanimous / multi, 4) if multi else None,
        )

    @staticmethod
    def _vote(
        record: dict[str, Any],
        origin: str,
        line: int,
        offered: dict[str, Any],
        votes: list,
        bad: list,
        default_annotator: str,
    ) -> None:
        if "_error" in record:
            bad.append({"origin": origin, "line": line, "reason": "invalid_json", "detail": record["_error"]})
            return
        pair_id, choice = record.get("pair_id"), record.get("choice")
        if pair_id not in offered:
            bad.append({"origin": origin, "line": line, "reason": "unknown_pair", "detail": str(pair_id)[:200]})
            return
        if choice not in CHOICES:
            bad.append(
                {
                    "origin": origin,
                    "line": line,
                    "reason": "bad_choice",
                    "detail": f"{str(choice)[:50]!r} is not one of {', '.join(CHOICES)}",
                }
            )
            return
        votes.append(
            {
                "pair_id": pair_id,
                "annotator": str(record.get("annotator") or default_annotator),
                "choice": choice,
                "note": str(record.get("note") or ""),
                "origin": "ui" if origin == "ui" else "file",
            }
        )
