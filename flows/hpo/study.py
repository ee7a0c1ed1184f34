"""The Optuna side of a study: its storage, sampler and pruner, who runs which trial, retries of trials
whose process died, and the numbers a trial is judged by, read back from the artifacts it made.

A trial's training run streams its validation values; `TrialPruning` reports them to the trial as they
come and stops the run when the pruner says so. Each value is also appended to a record in the run's
staging directory (`_scratch/hpo-validation.jsonl`, gone once the run is committed), so a later trial
with the same fingerprint (a repeated configuration, a rerun of the study) first replays those values:
if the pruner stops it there again, no rank is started; if not, the run resumes from its checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import warnings
from typing import Any

import psutil

from flows.config import ConfigError
from flows.hpo.space import Search
from tasks import journal
from tasks.stage import UnitStopped

log = logging.getLogger("kiln.hpo")

RECORD = "hpo-validation.jsonl"
HOST = socket.gethostname()


def owner() -> dict[str, Any]:
    """Who runs a trial: this host and process (its start time tells a reused pid apart)."""
    return {"host": HOST, "pid": os.getpid(), "started": psutil.Process().create_time()}


def alive(who: dict[str, Any]) -> bool:
    try:
        return abs(psutil.Process(int(who["pid"])).create_time() - float(who["started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# storage, sampler, pruner


def study_dir(search: Search) -> str:
    return os.path.abspath(os.path.join(search.hpo.directory, search.study_name))


def storage_url(search: Search) -> str:
    """The study's SQLAlchemy URL (with its password, where it has one: never print it unmasked)."""
    s = search.hpo.storage
    if s is None:
        os.makedirs(study_dir(search), exist_ok=True)
        return f"sqlite:///{os.path.join(study_dir(search), 'study.db')}"
    if s == "server":
        from flows.server import ServerError, shared_database_url

        try:
            return shared_database_url("optuna")
        except ServerError as e:
            raise ConfigError(f"hpo.storage: server: {e}") from None
    return s


def masked(url: str) -> str:
    from flows.server import mask

    return mask(url)


def open_storage(search: Search) -> Any:
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(search)
    hb = search.hpo.heartbeat_seconds
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=hb,
                grace_period=3 * hb,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=search.hpo.retries),
            )
        except Exception as e:  # a URL SQLAlchemy cannot use, a database that does not answer
            raise ConfigError(f"hpo.storage: cannot open {masked(url)}: {type(e).__name__}: {e}") from None


def sampler(search: Search) -> Any:
    import optuna

    h = search.hpo
    if h.sampler == "grid":
        return optuna.samplers.GridSampler({p.path: p.grid_values() for p in search.params}, seed=h.seed)
    if h.sampler == "random":
        return optuna.samplers.RandomSampler(seed=h.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: trials running side by side count as bad meanwhile, so they spread out
        return optuna.samplers.TPESampler(
            seed=h.seed, n_startup_trials=h.startup_trials, multivariate=True, constant_liar=h.parallel > 1
        )


def pruner(search: Search) -> Any:
    """The pruner. Optuna does not store it with the study: every process that runs trials builds the
    same one from the same config."""
    import optuna

    p = search.hpo.pruner
    if p.kind == "none" or search.objective.prune_stage is None:
        return optuna.pruners.NopPruner()
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.kind == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps
        )
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.ThresholdPruner(lower=p.lower, upper=p.upper)


def open_study(search: Search, storage: Any, fresh: bool = False) -> Any:
    import optuna

    name = search.study_name
    if fresh and name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
        log.info("study %s deleted from its storage: it starts over (trained runs stay cached)", name)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler(search),
        pruner=pruner(search),
        direction=search.objective.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != search.objective.direction:
        raise ConfigError(
            f"hpo.objective.direction: study {name} was created to {study.direction.name.lower()}; "
            f"this config would {search.objective.direction} (start it over with --fresh, or name another study)"
        )
    return study


def finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def recover(study: Any, storage: Any, retries: int) -> list[int]:
    """Trials a dead or interrupted process left: a running trial whose owner on this host is gone is
    marked failed, and each such trial (and each one a Ctrl-C stopped) is queued again with its values,
    once, up to `retries` times in a row. Returns the numbers queued again."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=retries)
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    study_id = storage.get_study_id_from_name(study.study_name)
    queued = []
    for t in trials:
        who = t.user_attrs.get("kiln_owner") or {}
        dead = t.state == TrialState.RUNNING and who.get("host") == HOST and not alive(who)
        stopped = t.state == TrialState.FAIL and t.user_attrs.get("kiln_interrupted")
        if not (dead or stopped) or t.number in retried:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        if dead:
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            log.info("trial %d: its process (pid %s) is gone; marked failed", t.number, who.get("pid"))
        before = len(study.get_trials(deepcopy=False))
        retry(study, storage.get_trial(trial_id))
        if len(study.get_trials(deepcopy=False)) > before:
            queued.append(t.number)
    return queued


# --------------------------------------------------------------------------------------------------
# what a trial is judged by


def _metrics_json(path: str) -> dict[str, Any]:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(f"{p.rstrip('/')}/metrics.json", "r") as f:
        return json.load(f)


def validation_values(path: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of `metric` at each validation of a committed training run."""
    history = _metrics_json(path)["history"]
    return [(h["step"], float(h[metric])) for h in history if h["kind"] == "validation" and metric in h]


def train_value(path: str, metric: str, direction: str) -> float:
    """The best validation value of `metric` over a training run (the objective of a training section)."""
    values = [v for _, v in validation_values(path, metric)]
    if not values:
        raise ValueError(f"{path} has no validation {metric}: the run had no validation split")
    return min(values) if direction == "minimize" else max(values)


def eval_value(path: str, metric: str) -> float:
    """An eval artifact's metric: TASK/METRIC, or TASK for its headline metric (the first one)."""
    from tasks.artifacts import Artifact

    rows = Artifact.open(path).read_table().to_pylist()
    task, _, name = metric.partition("/")
    mine = [r for r in rows if r["task"] == task and (r["subtask"] in (task, None) or not name)]
    hits = [r for r in mine if (r["metric"] == name if name else r["headline"]) and r["value"] is not None]
    if not hits:
        have = sorted({f"{r['task']}/{r['metric']}" for r in rows})
        raise ValueError(f"hpo.objective.metric: {path} has no {metric} (it has: {', '.join(have) or 'nothing'})")
    return float(hits[0]["value"])


# --------------------------------------------------------------------------------------------------
# pruning on the validation values a run streams


def record_path(staging: Any) -> str | None:
    """Where the validation values of an uncommitted run are recorded (local stores only)."""
    from tasks.artifacts.paths import SCRATCH_DIR, is_local, join

    return join(staging.fs, staging.dir, SCRATCH_DIR, RECORD) if is_local(staging.fs) else None


def read_record(path: str | None) -> dict[int, dict[str, Any]]:
    """Validation events by step (a resumed run streams some again: the last one counts)."""
    return {int(event["step"]): event for event in journal.read(path)}


class TrialPruning:
    """A trial's pruning: the validation values of its training run reported to the Optuna trial (as
    they stream, replayed from the record, or read from the committed run), the pruner asked after each
    one before the last step, and the run stopped (UnitStopped) when it says so."""

    def __init__(self, trial: Any, metric: str, sign: float, max_steps: int, record: str | None):
        self.trial = trial
        self.metric = metric
        self.sign = sign
        self.max_steps = max_steps
        self.record = record
        self.reported: set[int] = set()
        self.pruned: tuple[int, float] | None = None
        self._lock = threading.Lock()

    def offer(self, step: int, value: float, may_prune: bool = True) -> bool:
        """Report one value; True when the pruner stops the trial here."""
        with self._lock:
            if step in self.reported:
                return False
            self.trial.report(self.sign * value, step)
            self.reported.add(step)
            if may_prune and step < self.max_steps and self.trial.should_prune():
                self.pruned = (step, value)
                return True
        return False

    def replay(self) -> bool:
        """The values an earlier run of the same fingerprint streamed, in order; True if pruned on them."""
        for step, event in sorted(read_record(self.record).items()):
            if self.metric in event and self.offer(step, float(event[self.metric])):
                return True
        return False

    def __call__(self, event: dict[str, Any]) -> None:  # an observer of the training run (launch.observing)
        if event.get("kiln") != "validation" or self.metric not in event:
            return
        if self.record is not None:
            journal.append(self.record, event)
        if self.offer(int(event["step"]), float(event[self.metric])):
            raise UnitStopped(self.reason())

    def reason(self) -> str:
        step, value = self.pruned
        return f"pruned at step {step} of {self.max_steps}: validation {self.metric} {value:.4f}"
