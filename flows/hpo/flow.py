"""The `kiln-hpo` flow: an Optuna study whose trials are `kiln-hpo-trial` subflows.

    kiln hpo CONFIG            # or the kiln-hpo deployment (deployments/prefect.yaml)

1. The search is checked against the pipeline (flows/hpo/space.py); a bad path or range stops here,
   before anything runs.
2. The stages every trial reads but no searched value changes (the data stages) run once, as in
   `kiln run`, and come back Cached when they are committed.
3. Trials run (`parallel` at once, each with its share of the devices) until `n_trials` have finished
   or the time budget is spent. A trial is a subflow that runs the stages its values change with the
   pipeline's own tasks, so a configuration already trained comes back Cached (the subflow is named
   Cached too); its training run's validation values go to the pruner as they stream, and a pruned run's
   ranks are stopped, nothing of it committed: the subflow ends Pruned, and is not retried.
4. The trials table, best.yaml and the plots go to the study's directory and to Prefect artifacts.

The study lives in its storage (SQLite by default, PostgreSQL to share it), so a stopped or killed study
resumes where it was: trials that finished stay finished, one whose process died runs again (its
training resumes from its checkpoints).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import CancelledRun
from prefect.logging import get_run_logger
from prefect.states import Completed

from flows.config import ConfigError, PipelineConfig
from flows.data import run_stages
from flows.hpo import report
from flows.hpo import study as studies
from flows.hpo.space import Search, check_runs, device_shares, prepare
from flows.plan import PlannedStage, plan_pipeline, store_for


class TrialFailed(RuntimeError):
    """A trial that failed on its own (a run that crashed, values the config refuses): recorded, not retried."""


@dataclass
class LiveTrial:
    """What a running trial subflow needs beyond its parameters: its search and its Optuna trial."""

    search: Search
    trial: Any


_live: dict[str, LiveTrial] = {}
# Trials side by side whose values make the same run: the second waits for the first, then finds it
# committed (Cached) instead of waiting on the run's lock and failing.
_run_locks: dict[str, threading.Lock] = {}
_run_locks_guard = threading.Lock()


@contextlib.contextmanager
def _runs_locked(stages: list[PlannedStage]):
    with _run_locks_guard:
        locks = [_run_locks.setdefault(f"{p.kind}/{p.fingerprint}", threading.Lock()) for p in stages]
    ordered = sorted(set(locks), key=id)
    for lock in ordered:
        lock.acquire()
    try:
        yield
    finally:
        for lock in reversed(ordered):
            lock.release()


@flow(name="kiln-hpo-trial", log_prints=True)
def trial_flow(config: PipelineConfig, study: str, number: int, params: dict[str, Any]) -> Any:
    """One trial: the stages its values change, judged by the objective."""
    logger = get_run_logger()
    live = _live[f"{study}#{number}"]
    search, o = live.search, live.search.objective
    logger.info("trial %d: %s", number, ", ".join(f"{k}={v!r}" for k, v in params.items()))
    first = {p.name: p for p in plan_pipeline(config)}
    with _runs_locked([first[n] for n in search.trial_stages]):
        planned = {p.name: p for p in plan_pipeline(config)}  # a trial beside this one may have committed them
        pruning, watch = None, contextlib.nullcontext()
        if o.prune_stage is not None:
            from tasks.train import launch

            run = planned[o.prune_stage]
            staging = store_for(config).staging(run.kind, run.fingerprint)
            record = None if run.committed else studies.record_path(staging)
            pruning = studies.TrialPruning(live.trial, o.prune_metric, o.prune_sign, run.cfg.max_steps, record)
            if not run.committed and pruning.replay():
                why = f"{pruning.reason()}, as when this configuration ran before: no rank started"
                logger.info("trial %d %s", number, why)
                return Completed(name="Pruned", message=why, data={"pruned": why})
            watch = launch.observing(staging.dir, pruning)
        try:
            with watch:
                refs = run_stages(config, include=lambda p: p.name in search.trial_stages)
        except CancelledRun:
            if pruning is not None and pruning.pruned is not None:
                logger.info("trial %d %s; its ranks were stopped, nothing committed", number, pruning.reason())
                return Completed(name="Pruned", message=pruning.reason(), data={"pruned": pruning.reason()})
            raise
    target = planned[o.section]
    path = refs[o.section]["path"] if o.section in refs else target.path
    if o.kind == "train":
        value = studies.train_value(path, o.metric, o.direction)
    else:
        value = studies.eval_value(path, o.metric)
    if pruning is not None:  # a run that came from cache reports its values too (the pruner's statistics)
        for step, v in studies.validation_values(planned[o.prune_stage].path, o.prune_metric):
            pruning.offer(step, v, may_prune=False)
    cached = all(r["cached"] for r in refs.values())
    message = f"{o.metric} = {value:.6g}" + (" (every stage from cache)" if cached else "")
    logger.info("trial %d: %s", number, message)
    return Completed(
        name="Cached" if cached else "Completed",
        message=message,
        data={"value": value, "cached": cached, "fingerprint": target.fingerprint},
    )


def _objective(search: Search, context: contextvars.Context, shares: queue.Queue, workers: int):
    """Optuna's objective: sample, run the trial subflow (in the flow's context, so it is a subflow of
    the study's run even from Optuna's worker threads), and read its outcome."""
    import optuna
    from prefect.task_runners import ThreadPoolTaskRunner

    def objective(trial: Any) -> float:
        share = shares.get()
        try:
            trial.set_user_attr("kiln_owner", studies.owner())
            trial.set_user_attr("kiln_interrupted", False)
            values = {p.path: p.suggest(trial) for p in search.params}
            try:
                cfg = search.config_for(values, share)
            except ConfigError as e:
                trial.set_user_attr("note", str(e).splitlines()[-1].strip())
                raise TrialFailed(str(e)) from None
            key = f"{search.study_name}#{trial.number}"
            _live[key] = LiveTrial(search, trial)
            # the training run's unit must run in this process for its events to reach the pruner: threads
            run = trial_flow.with_options(
                flow_run_name=f"trial-{trial.number}", task_runner=ThreadPoolTaskRunner(max_workers=workers)
            )
            try:
                state = context.copy().run(
                    run, config=cfg, study=search.study_name, number=trial.number, params=values, return_state=True
                )
            finally:
                _live.pop(key, None)
        except (KeyboardInterrupt, SystemExit):  # stopped, not failed: the study's next run retries it
            trial.set_user_attr("kiln_interrupted", True)
            raise
        finally:
            shares.put(share)
        if state.name == "Pruned":
            trial.set_user_attr("note", state.message or "pruned")
            raise optuna.TrialPruned(state.message)
        if not state.is_completed():
            trial.set_user_attr("note", (state.message or state.name)[:500])
            raise TrialFailed(f"trial {trial.number}: {state.message or state.name}")
        result = state.result()
        trial.set_user_attr("cached", result["cached"])
        trial.set_user_attr("fingerprint", result["fingerprint"])
        return result["value"]

    return objective


def _artifact_key(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "study"


def publish(study: Any, search: Search, storage: str) -> dict[str, Any]:
    """The trials table, best.yaml and plots in the study's directory, and as Prefect artifacts."""
    directory = studies.study_dir(search)
    os.makedirs(directory, exist_ok=True)
    rows = report.trial_rows(study, search)
    report.write_trials(rows, search, os.path.join(directory, "trials.parquet"))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    best_path = os.path.join(directory, "best.yaml")
    if best is not None:
        report.write_atomically(best_path, report.best_yaml(search, best))
    figures = report.plots(study, search, os.path.join(directory, "plots"))
    key = _artifact_key(search.study_name)
    create_table_artifact(
        key=f"hpo-{key}-trials",
        table=[{k: v for k, v in r.items()} for r in rows],
        description=f"**{search.study_name}**: {len(rows)} trials, objective {search.objective.describe}",
    )
    create_markdown_artifact(
        key=f"hpo-{key}-report",
        markdown=report.markdown(search, rows, best, storage, figures),
        description=f"{search.study_name}: trials, best values, plots",
    )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {
        "study": search.study_name,
        "storage": storage,
        "directory": directory,
        "objective": search.objective.describe,
        "counts": counts,
        "trials": rows,
        "params": [p.path for p in search.params],
        "best": None
        if best is None
        else {
            "trial": best.number,
            "value": best.value,
            "params": best.params,
            "fingerprint": best.user_attrs.get("fingerprint"),
        },
        "best_yaml": best_path if best is not None else None,
        "plots": [path for _, path, _ in figures],
    }


@flow(name="kiln-hpo", log_prints=True)
def hpo_flow(config: PipelineConfig, fresh: bool = False) -> dict[str, Any]:
    """A hyperparameter search over `config` (its `hpo:` section): trials as subflows over cached runs,
    resumed from the study's storage. `fresh`: delete the study first and start over (runs stay cached)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    logger = get_run_logger()
    search = prepare(config)
    h = search.hpo
    logger.info(
        "study %s: %s; trials run %s; shared by all, run once: %s",
        search.study_name,
        search.objective.describe,
        ", ".join(search.trial_stages),
        ", ".join(search.shared_stages) or "nothing",
    )
    if search.shared_stages:
        run_stages(config, include=lambda p: p.name in search.shared_stages)
    check_runs(search)

    storage = studies.open_storage(search)
    shown = studies.masked(studies.storage_url(search))
    study = studies.open_study(search, storage, fresh)
    queued = studies.recover(study, storage, h.retries)
    if queued:
        logger.info("trials %s were stopped before they finished: queued to run again", queued)
    done = len(studies.finished(study))
    remaining = h.n_trials - done
    logger.info("study %s in %s: %d of %d trials finished", search.study_name, shown, done, h.n_trials)
    if remaining > 0:
        shares: queue.Queue = queue.Queue()
        for share in device_shares(search):
            shares.put(share)
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(
                _objective(search, contextvars.copy_context(), shares, config.runtime.workers),
                n_trials=remaining,
                timeout=h.timeout_minutes * 60 if h.timeout_minutes else None,
                n_jobs=h.parallel,
                catch=(Exception,),
                callbacks=[MaxTrialsCallback(h.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
            )
        logger.info("%d trial(s) ran in %.1f s", len(study.trials) - done, time.monotonic() - t0)
    return publish(study, search, shown)
