"""The launcher's reading of how ranks ended, with real subprocesses standing in for the rank group: a group
that dies after every rank reported its work written is a finished run; any other death is a failure that
names what happened."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from tasks.train import launch
from tasks.train.config import TrainConfig
from tasks.train.launch import TrainLaunchError


def group(monkeypatch, script: str) -> None:
    """Make the launcher start `script` (Python) instead of torchrun."""
    monkeypatch.setattr(launch, "command", lambda cfg, run_json: ([sys.executable, "-c", script], {}))


def events(*evs: dict) -> str:
    return "".join(f"print({json.dumps(json.dumps({'kiln': e.pop('kiln'), **e}))}, flush=True)\n" for e in evs)


CFG = TrainConfig.model_validate({"model": {"init": {"model_type": "llama"}}, "launch": {"procs_per_node": 2}})


def test_abort_after_every_rank_finished_is_a_complete_run(monkeypatch, caplog):
    group(
        monkeypatch,
        events(
            {"kiln": "saved", "path": "/x", "steps": 3},
            {"kiln": "finished", "rank": 0},
            {"kiln": "finished", "rank": 1},
        )
        + "import os; os.abort()\n",
    )
    with caplog.at_level(logging.WARNING, logger="kiln.train"):
        got = launch.run(CFG, "unused.json")
    assert [e["kiln"] for e in got] == ["saved", "finished", "finished"]
    assert "after every rank had finished" in caplog.text


def test_abort_before_a_rank_finished_is_a_failure(monkeypatch):
    group(monkeypatch, events({"kiln": "finished", "rank": 0}) + "import os; os.abort()\n")
    with pytest.raises(TrainLaunchError, match="exited with code"):
        launch.run(CFG, "unused.json")


def test_a_rank_error_fails_the_run_even_if_others_finished(monkeypatch):
    group(
        monkeypatch,
        events(
            {"kiln": "finished", "rank": 0},
            {"kiln": "finished", "rank": 1},
            {"kiln": "error", "rank": 1, "error": "ValueError: boom"},
        )
        + "raise SystemExit(1)\n",
    )
    with pytest.raises(TrainLaunchError, match="rank 1: ValueError: boom"):
        launch.run(CFG, "unused.json")


def test_clean_exit_returns_the_events(monkeypatch):
    group(monkeypatch, events({"kiln": "step", "step": 1, "loss": 2.5}))
    assert launch.run(CFG, "unused.json") == [{"kiln": "step", "step": 1, "loss": 2.5}]


def test_events_that_ran_together_on_one_line_are_all_read(monkeypatch):
    # Two ranks share the launcher's pipe: an event can follow other output, or another event, on one line.
    a = json.dumps({"kiln": "error", "rank": 0, "error": "loss is nan at step 2; stopping", "kind": "non_finite_loss"})
    b = json.dumps({"kiln": "error", "rank": 1, "error": "loss is nan at step 2; stopping", "kind": "non_finite_loss"})
    line = "warning: x " + a + b + chr(10)
    script = f"import sys; sys.stdout.write({line!r}); sys.stdout.flush(); raise SystemExit(3)\n"
    group(monkeypatch, script)
    with pytest.raises(TrainLaunchError, match=r"training stopped on rank 0: loss is nan at step 2"):
        launch.run(CFG, "unused.json")
