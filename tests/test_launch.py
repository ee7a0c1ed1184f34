"""The launcher's reading of how ranks ended, with real subprocesses standing in for the rank group: a group
that dies after every rank reported its work written is a finished run; any other death is a failure that
names what happened."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import pytest

from tasks.train import launch
from tasks.train.config import TrainConfig
from tasks.train.launch import TrainLaunchError


def group(monkeypatch, script: str) -> None:
    """Make the launcher start `script` (Python) instead of torchrun."""
    monkeypatch.setattr(launch, "command", lambda cfg, run_json, module=None: ([sys.executable, "-c", script], {}))


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


TORCHRUN_SUMMARY = """
print("Failures:")
print("  rank      : 0 (local_rank: 0)")
print("  exitcode  : -15 (pid: 11)  (SIGTERM)")
print("Root Cause (first observed failure):")
print("  rank      : 1 (local_rank: 1)")
print("  exitcode  : -6 (pid: 12)  (SIGABRT)", flush=True)
raise SystemExit(1)
"""


def test_a_rank_that_reported_its_error_then_aborted_is_explained_by_its_error(monkeypatch):
    """Both ranks stop on a NaN loss and say so; rank 1 then aborts on its way out ("terminate called
    without an active exception") and torchrun names that abort as the root cause: the error is the
    cause, not the abort."""
    nan = "loss is nan at step 2; stopping"
    group(
        monkeypatch,
        events(
            {"kiln": "error", "rank": 0, "error": nan, "kind": "non_finite_loss"},
            {"kiln": "error", "rank": 1, "error": nan, "kind": "non_finite_loss"},
        )
        + TORCHRUN_SUMMARY,
    )
    with pytest.raises(TrainLaunchError, match="training stopped on rank 0: loss is nan at step 2"):
        launch.run(CFG, "unused.json")


def test_a_rank_killed_without_a_word_is_the_cause(monkeypatch):
    group(monkeypatch, TORCHRUN_SUMMARY)
    with pytest.raises(TrainLaunchError, match="rank 1 was killed by SIGABRT"):
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


def test_an_observer_that_raises_stops_the_group_and_its_error_goes_up(monkeypatch, tmp_path):
    """An HPO trial's pruner watches the run's events by its output directory; raising UnitStopped from
    the observer kills the launcher's group at once (the script would otherwise run for a minute)."""
    from tasks.stage import UnitStopped

    group(
        monkeypatch,
        events({"kiln": "validation", "step": 2, "loss": 5.0}) + "import time; time.sleep(60)\n",
    )
    seen = []

    def observer(event):
        seen.append(event)
        if event["kiln"] == "validation":
            raise UnitStopped("pruned at step 2")

    out = str(tmp_path / "run")
    t0 = time.monotonic()
    with launch.observing(out, observer), pytest.raises(UnitStopped, match="pruned at step 2"):
        launch.run(CFG, "unused.json", on_event=lambda e: launch.notify(out, e))
    assert time.monotonic() - t0 < 20 and seen == [{"kiln": "validation", "step": 2, "loss": 5.0}]
    launch.notify(out, {"kiln": "validation"})  # the observer is gone with its block
    assert len(seen) == 1


def test_cpu_devices_pin_the_launcher_and_its_ranks_to_those_cores(monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    script = (
        "import json, os, subprocess, sys\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'],"
        " capture_output=True, text=True).stdout.strip()\n"
        "print(json.dumps({'kiln': 'cores', 'launcher': sorted(os.sched_getaffinity(0)), 'rank': child}))\n"
    )
    group(monkeypatch, script)
    cfg = TrainConfig.model_validate({**CFG.model_dump(), "launch": {"procs_per_node": 2, "devices": cores[-1:]}})
    launch.check_hardware(cfg)
    (event,) = launch.run(cfg, "unused.json")
    assert event["launcher"] == cores[-1:] and event["rank"] == str(cores[-1:])
    absent = TrainConfig.model_validate({**CFG.model_dump(), "launch": {"devices": [max(cores) + 64]}})
    with pytest.raises(TrainLaunchError, match="train.launch.devices: cores"):
        launch.check_hardware(absent)
