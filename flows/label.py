"""The labelling flow (`kiln-label`): a person answers, in the Prefect UI, which of two replies is better.

For a `feedback` section, the flow offers each pair of its candidates that has no answer yet: the flow
run pauses with a form (A / B / tie / skip, and a note) whose description shows the prompt and the two
replies; the answer is appended to the section's journal the moment it arrives, then the next pair is
shown. A killed or cancelled labelling run loses no answer, and its rerun asks only the rest. When every
pair is answered, the feedback stage commits the answers as a preference artifact like any other.

    kiln label CONFIG SECTION          # then answer in the UI: Runs > the paused run > Resume
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.logging import get_run_logger
from pydantic import Field

from flows.config import ConfigError, PipelineConfig
from flows.plan import plan_pipeline
from flows.stages import run_planned_stage


class LabelInput(RunInput):
    """The form a person fills in for one pair."""

    choice: Literal["A", "B", "tie", "skip"] = Field(description="Which reply is better: A, B, a tie, or skip.")
    note: str = Field("", description="Optional: why.")


def _cell(text: str) -> str:
    return text.replace("\n", "  \n")


def describe(pair: dict[str, Any], messages: list[dict[str, str]], done: int, total: int) -> str:
    """The markdown the UI shows above the form."""
    turns = "\n\n".join(f"**{m['role']}:** {_cell(m['content'])}" for m in messages)
    return (
        f"### Which reply is better? (pair {done + 1} of {total}, `{pair['pair_id']}`)\n\n{turns}\n\n"
        f"---\n\n**A:** {_cell(pair['reply_a'])}\n\n---\n\n**B:** {_cell(pair['reply_b'])}\n"
    )


def feedback_section(config: PipelineConfig, section: str, generated: bool = True) -> tuple[Any, Any]:
    """(the planned feedback stage, its candidates' planned stage); a clear error when the section is not a
    feedback section, or (`generated`) when its candidates are not committed yet."""
    planned = {p.name: p for p in plan_pipeline(config)}
    p = planned.get(section)
    if p is None or p.kind != "feedback":
        kinds = sorted(n for n, q in planned.items() if q.kind == "feedback")
        raise ConfigError(
            f"{section}: not a feedback section of this pipeline (feedback sections: {', '.join(kinds) or 'none'})"
        )
    candidates = planned[p.inputs[0]]
    if generated and not candidates.committed:
        raise ConfigError(
            f"{section}: its candidates ({candidates.name}) are not generated yet: run the pipeline "
            f"(kiln run CONFIG --only {candidates.name}, or the stages before it) first"
        )
    return p, candidates


def upstream(config: PipelineConfig, name: str) -> set[str]:
    """The stage `name` and every stage it reads, directly or not."""
    planned = {p.name: p for p in plan_pipeline(config)}
    todo, seen = [name], set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(planned[n].inputs)
    return seen


def generate_candidates(config: PipelineConfig, section: str) -> None:
    """Run (or take from cache) the stages the feedback section's candidates come from."""
    from flows.data import run_stages

    _, candidates = feedback_section(config, section, generated=False)
    if not candidates.committed:
        needed = upstream(config, candidates.name)
        get_run_logger().info("%s: generating its candidates first (%s)", section, ", ".join(sorted(needed)))
        run_stages(config, include=lambda p: p.name in needed)


@flow(name="kiln-label", log_prints=True)
def label_flow(config: PipelineConfig, section: str = "feedback", timeout_s: int = 24 * 3600) -> dict[str, Any]:
    """Ask, pair by pair, for the answers the feedback section `section` still lacks; then commit them.
    Candidates not generated yet are generated first (the stages they come from run, or come from cache)."""
    from tasks.artifacts import Artifact
    from tasks.prefs.feedback import append_answer, offered_pairs, read_journal
    from tasks.prefs.schema import load_messages

    logger = get_run_logger()
    generate_candidates(config, section)
    planned, candidates = feedback_section(config, section)
    cfg = planned.cfg
    pairs = offered_pairs(Artifact.open(candidates.path), cfg)
    answered = {a["pair_id"] for a in read_journal(cfg.journal, candidates.fingerprint)}
    todo = [p for p in pairs if p["pair_id"] not in answered]
    logger.info("%s: %d pair(s) offered, %d answered already, %d to ask", section, len(pairs), len(answered), len(todo))
    for pair in todo:
        form = LabelInput.with_initial_data(
            description=describe(
                pair, load_messages(pair["prompt"]), len(pairs) - len(todo) + todo.index(pair), len(pairs)
            )
        )
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=1)
        append_answer(
            cfg.journal,
            {
                "candidates": candidates.fingerprint,
                "pair_id": pair["pair_id"],
                "choice": answer.choice,
                "note": answer.note,
                "annotator": "ui",
                "at": time.time(),
            },
        )
        logger.info("%s: %s -> %s", section, pair["pair_id"], answer.choice)
    # the answers changed the section's fingerprint: plan again, then commit the preference artifact
    planned, candidates = feedback_section(config, section)
    ref = run_planned_stage(planned, config, [{"path": candidates.path}], refresh=False)
    logger.info("%s: committed %s", section, ref["path"])
    return ref
