"""Hyperparameter search (`kiln hpo`): the search space refused before any trial, values by path, pruning
replayed from a run's record, killed trials queued again; end to end on the tiny Llama with real DeepSpeed
ranks: a study of six trials with one pruned, its rerun from cache, best.yaml, and a killed study resumed
through a real Prefect server with its study on PostgreSQL."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.config import ConfigError, load_config, parse_config
from flows.hpo.space import prepare
from flows.plan import plan_pipeline

from conftest import REPO
from train_fixtures import TINY_LLAMA


def pipeline(store, hpo_dir, **hpo) -> dict:
    """The tiny pipeline the train tests use (examples/data -> BPE -> pack -> a 1-layer Llama), with a study."""
    return {
        "name": "tiny",
        "store": {"root": str(store)},
        "ingest": {"paths": [os.path.join(REPO, "examples", "data")]},
        "tokenizer": {"vocab_size": 512},
        "tokenize": {},
        "pack": {"seq_len": 64, "validation_fraction": 0.1},
        "train": {
            "model": {"init": TINY_LLAMA},
            "max_steps": 8,
            "micro_batch_size": 4,
            "eval_every": 4,
            "eval_batches": 1,
            "log_every": 4,
            "save_every": 4,
            "optim": {"lr": 3e-3, "warmup_steps": 2},
        },
        "hpo": {"directory": str(hpo_dir), **hpo},
    }


# --------------------------------------------------------------------------------------------------
# before any trial


BAD = [
    (
        {"train.optim.lrr": {"low": 1e-4, "high": 1e-2}},
        "hpo.params.train.optim.lrr: unknown field 'lrr' in train.optim",
    ),
    ({"train.optim.lrr": {"low": 1e-4, "high": 1e-2}}, "did you mean lr?"),
    ({"trian.optim.lr": {"low": 1e-4, "high": 1e-2}}, "no section 'trian' (sections: ingest, tokenizer, tokenize"),
    ({"train.model.init.hidden_sise": {"choices": [16, 32]}}, "train.model.init has no key 'hidden_sise'"),
    ({"train.optim": {"low": 0.1, "high": 0.2}}, "train.optim is a section, not a value"),
    ({"train.optim.lr": {"low": 1e-2, "high": 1e-4}}, "hpo.params.train.optim.lr: empty range: low 0.01 is above high"),
    ({"train.optim.lr": {"choices": []}}, "hpo.params.train.optim.lr: empty range: choices is an empty list"),
    ({"train.max_steps": {"low": 8, "high": 8}}, "hpo.params.train.max_steps: the range holds one value (8)"),
    ({"train.optim.lr": {"low": 0.0, "high": 1e-2, "log": True}}, "log: a log range needs low > 0"),
    ({"train.optim.lr": {"low": 0.0, "high": 1e-2}}, "hpo.params.train.optim.lr: the config refuses 0.0"),
    ({"train.max_steps": {"low": 4, "high": 8.5}}, "hpo.params.train.max_steps.high: 8.5 is not a whole number"),
    ({"train.log_every": {"choices": [1, 2]}}, "hpo.params.train.log_every: no stage's fingerprint depends on it"),
    ({"train.launch.procs_per_node": {"low": 1, "high": 2}}, "no stage's fingerprint depends on it"),
    ({"train.model.init.model_type": {"low": 1, "high": 2}}, "not a number field (its value: 'llama')"),
]


@pytest.mark.parametrize("params, message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_a_bad_search_space_is_refused_naming_the_field(tmp_path, params, message):
    data = pipeline(tmp_path / "store", tmp_path / "hpo", params=params)
    with pytest.raises(ConfigError) as e:
        prepare(parse_config(data, "study.yaml"), "study.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("study.yaml: ")


def test_the_objective_and_the_sampler_are_checked_too(tmp_path):
    def refused(**hpo) -> str:
        data = pipeline(tmp_path / "store", tmp_path / "hpo", **hpo)
        with pytest.raises(ConfigError) as e:
            prepare(parse_config(data, "s.yaml"), "s.yaml")
        return str(e.value)

    lr = {"train.optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    assert "lr: a grid takes no log range; list the values as choices" in refused(params=lr, sampler="grid")
    plain = {"train.optim.lr": {"low": 1e-4, "high": 1e-2}}
    assert "a grid needs choices, an int range or a float range with a step" in refused(params=plain, sampler="grid")
    assert "hpo.objective.metric: the causal_lm objective of train reports loss, perplexity; not 'acc'" in refused(
        params=lr, objective={"metric": "acc"}
    )
    assert "hpo.objective.section: 'trian' is not a training or eval section" in refused(
        params=lr, objective={"section": "trian"}
    )
    assert "hpo.parallel: 64 trials at once, but this machine has" in refused(params=lr, parallel=64)
    two = pipeline(tmp_path / "store", tmp_path / "hpo", params=lr)
    two["sft"] = {**copy.deepcopy(two["train"]), "kind": "train"}
    with pytest.raises(ConfigError, match="several training sections \\(train, sft\\): name the one"):
        prepare(parse_config(two, "s.yaml"))
    two["hpo"]["objective"] = {"section": "sft"}
    with pytest.raises(ConfigError, match="hpo.params.train.optim.lr: it changes train, none of which sft"):
        prepare(parse_config(two, "s.yaml"))


def test_an_eval_objective_prunes_on_its_training_runs_validation(tmp_path):
    data = pipeline(tmp_path / "store", tmp_path / "hpo", params={"train.optim.lr": {"low": 1e-4, "high": 1e-2}})
    data["eval"] = {"model_from": "train", "perplexity": True}
    data["hpo"]["objective"] = {"section": "eval", "metric": "perplexity/perplexity"}
    o = prepare(parse_config(data)).objective
    assert (o.kind, o.direction, o.prune_stage, o.prune_metric, o.prune_sign) == (
        "eval",
        "minimize",
        "train",
        "loss",
        1,
    )
    data["hpo"]["objective"] = {"section": "eval", "metric": "hellaswag/acc_norm"}
    o = prepare(parse_config(data)).objective
    assert o.direction == "maximize" and o.prune_sign == -1  # a falling loss is a rising value to the study
    search = prepare(parse_config(data))
    assert search.trial_stages == ["train", "eval"] and "pack" in search.shared_stages


def test_kiln_hpo_refuses_before_anything_runs(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(pipeline(tmp_path / "store", tmp_path / "hpo", params={"train.optim.lrr": {}})))
    r = CliRunner().invoke(app, ["hpo", str(path)], terminal_width=200)
    assert r.exit_code == 2 and "hpo.params.train.optim.lrr" in r.output
    data = pipeline(tmp_path / "store", tmp_path / "hpo", params={"train.optim.lrr": {"low": 1e-4, "high": 1e-2}})
    path.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(app, ["hpo", str(path)], terminal_width=200)
    assert r.exit_code == 2 and "unknown field 'lrr' in train.optim" in r.output
    assert not (tmp_path / "store").exists() and not (tmp_path / "hpo").exists()  # no stage, no study


def test_values_by_path_trial_configs_and_what_trials_share(tmp_path):
    data = pipeline(
        tmp_path / "store",
        tmp_path / "hpo",
        params={
            "train.optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
            "train.micro_batch_size": {"choices": [2, 4]},
            "train.max_steps": {"low": 4, "high": 12, "step": 4},
            "train.model.dropout.attention": {"low": 0.0, "high": 0.2, "step": 0.1},
            "train.model.init.hidden_size": {"choices": [32, 64]},
            "pack.seq_len": {"choices": [32, 64]},
        },
    )
    search = prepare(parse_config(data, "s.yaml"))
    kinds = {p.path: (p.kind, p.grid_values() if not p.spec.log else None) for p in search.params}
    assert kinds["train.max_steps"] == ("int", [4, 8, 12])
    assert kinds["train.model.dropout.attention"] == ("float", [0.0, 0.1, 0.2])
    assert kinds["train.micro_batch_size"][0] == "categorical" and search.objective.direction == "minimize"
    assert search.shared_stages == ["ingest", "tokenizer", "tokenize"] and search.trial_stages == ["pack", "train"]
    values = {
        "train.optim.lr": 0.003,
        "train.micro_batch_size": 2,
        "train.max_steps": 8,
        "train.model.dropout.attention": 0.1,
        "train.model.init.hidden_size": 64,
        "pack.seq_len": 32,
    }
    cfg = search.config_for(values, devices=[0])
    assert cfg.train.optim.lr == 0.003 and cfg.train.model.dropout.attention == 0.1 and cfg.pack.seq_len == 32
    assert cfg.train.model.init["hidden_size"] == 64 and cfg.train.model.init["num_hidden_layers"] == 1
    assert cfg.train.launch.devices == [0] and search.config.train.launch.devices is None
    # the devices a trial runs on are not part of what it makes: best.yaml's runs are the trial's runs
    plain = {p.name: p.fingerprint for p in plan_pipeline(search.config_for(values))}
    assert {p.name: p.fingerprint for p in plan_pipeline(cfg)} == plain
    text = yaml.safe_dump(search.data_for(values))
    again = parse_config(yaml.safe_load(text))
    assert again.hpo is None and {p.name: p.fingerprint for p in plan_pipeline(again)} == plain


def test_pruning_replays_a_runs_record_and_a_dead_owners_trial_runs_again(tmp_path):
    import optuna

    from flows.hpo import study as studies

    record = tmp_path / "staging" / "_scratch" / studies.RECORD
    record.parent.mkdir(parents=True)
    events = [{"kiln": "validation", "step": 4, "loss": 6.23}, {"kiln": "validation", "step": 8, "loss": 6.20}]
    record.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"kiln": "valid')  # the last line cut by a kill
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage, pruner=optuna.pruners.ThresholdPruner(upper=6.22))
    trial = study.ask()
    pruning = studies.TrialPruning(trial, "loss", 1.0, 12, str(record))
    assert pruning.replay() and pruning.pruned == (4, 6.23)
    assert "pruned at step 4 of 12: validation loss 6.2300" == pruning.reason()
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    # a live event of a run that is not pruned is recorded; one past the last step never prunes
    trial = study.ask()
    live = studies.TrialPruning(trial, "loss", 1.0, 8, str(tmp_path / "live" / studies.RECORD))
    live({"kiln": "validation", "step": 4, "loss": 6.0})
    live({"kiln": "validation", "step": 8, "loss": 6.5})
    assert live.pruned is None and sorted(studies.read_record(live.record)) == [4, 8]
    with pytest.raises(Exception, match="pruned at step 4"):
        studies.TrialPruning(study.ask(), "loss", 1.0, 8, None)({"kiln": "validation", "step": 4, "loss": 7.0})

    # a trial whose process died: failed, and queued again with its values; once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = study.ask({"train.optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    t.set_user_attr("kiln_owner", {"host": studies.HOST, "pid": dead.pid, "started": 0.0})
    mine = study.ask({"train.optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    mine.set_user_attr("kiln_owner", studies.owner())  # alive: left alone
    assert studies.recover(study, storage, retries=2) == [t.number]
    assert studies.recover(study, storage, retries=2) == []
    states = {x.number: x.state.name for x in study.trials}
    assert states[t.number] == "FAIL" and states[mine.number] == "RUNNING"
    (queued,) = [x for x in study.trials if x.state.name == "WAITING"]
    assert queued.params == t.params and queued.system_attrs["failed_trial"] == t.number


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: the data stages are made once and shared by every study below."""
    return tmp_path_factory.mktemp("hpo-store")


def trial_runs(study: str, skip: frozenset = frozenset()) -> dict[str, tuple[int, str, dict[str, str]]]:
    """{flow run id: (trial number, the subflow's state, {task: state})} of the kiln-hpo-trial runs of a
    study, less the runs in `skip`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    out = {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["kiln-hpo-trial"])))
        for r in runs:
            if r.parameters.get("study") != study or str(r.id) in skip:
                continue
            deadline = time.monotonic() + 30
            while True:  # task states reach the API as events: wait until each one is final
                tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
                if all(t.state.is_final() for t in tasks) or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            out[str(r.id)] = (r.parameters["number"], r.state.name, {t.name: t.state.name for t in tasks})
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_study_of_six_trials_one_pruned_its_rerun_cached_and_best_yaml(store, tmp_path):
    """A grid of six learning rates; one (1e-30: the weights stay put) is above the threshold at the first
    validation and is pruned there. The rerun of the study from scratch is entirely cached: the five
    trained runs come back Cached and the pruned one replays its recorded values and is pruned again,
    with no rank started. best.yaml is the pipeline with the best value, and runs from cache."""
    from flows.hpo.flow import hpo_flow
    from flows.pipeline import pipeline as pipeline_flow

    lrs = [1e-30, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2]
    data = pipeline(
        store,
        tmp_path / "hpo",
        study="six",
        params={"train.optim.lr": {"choices": lrs}},
        sampler="grid",
        n_trials=6,
        pruner={"kind": "threshold", "upper": 6.22},
    )
    config = parse_config(data)
    first = hpo_flow(config=config)
    assert first["counts"] == {"complete": 5, "pruned": 1}
    rows = {r["train.optim.lr"]: r for r in first["trials"]}
    assert sorted(rows) == sorted(lrs) and rows[1e-30]["state"] == "pruned"
    assert rows[1e-30]["note"].startswith("pruned at step 4 of 8: validation loss 6.2")
    assert all(r["cached"] is False for lr, r in rows.items() if lr != 1e-30)

    runs = {number: (state, tasks) for number, state, tasks in trial_runs("six").values()}
    assert len(runs) == 6
    pruned = rows[1e-30]["trial"]
    assert runs[pruned] == ("Pruned", {"train[0]": "Cancelled"})  # ranks stopped, no commit task
    assert all(
        runs[r["trial"]] == ("Completed", {"train[0]": "Completed", "train": "Completed"})
        for r in rows.values()
        if r is not rows[1e-30]
    )
    search = prepare(config)
    pruned_cfg = search.config_for({"train.optim.lr": 1e-30})
    pruned_train = next(p for p in plan_pipeline(pruned_cfg) if p.name == "train")
    assert not pruned_train.committed  # nothing committed; its checkpoint and record stay to resume from
    staging = os.path.join(str(store), "train", f".staging-{pruned_train.fingerprint}")
    assert os.path.exists(os.path.join(staging, "_scratch", "hpo-validation.jsonl"))

    directory = first["directory"]
    assert {"history.png", "intermediate.png", "importances.png", "parallel.png", "slice.png"} <= set(
        os.listdir(os.path.join(directory, "plots"))
    )
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(directory, "trials.parquet")).to_pylist()
    assert [r["state"] for r in table].count("pruned") == 1 and len(table) == 6
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (report,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["hpo-six-report"]))
        )[:1]
    assert "![Optimisation history](data:image/png;base64," in report.data

    # the study again, from scratch: every trial from cache, the pruned one pruned again without a launch
    first_ids = set(trial_runs("six"))
    t0 = time.monotonic()
    again = hpo_flow(config=config, fresh=True)
    assert time.monotonic() - t0 < 60
    assert again["counts"] == {"complete": 5, "pruned": 1}
    assert {r["train.optim.lr"]: r["value"] for r in again["trials"]} == {lr: r["value"] for lr, r in rows.items()}
    assert all(r["cached"] for r in again["trials"] if r["state"] == "complete")
    reruns = sorted(
        ((state, tasks) for _, state, tasks in trial_runs("six", skip=frozenset(first_ids)).values()),
        key=lambda run: run[0],
    )
    # five trained runs: the commit task Cached; the pruned one: no task at all, no rank started
    assert reruns == [("Cached", {"train": "Cached"})] * 5 + [("Pruned", {})], reruns

    # best.yaml: the pipeline with the best value; kiln run finds the best trial's training committed
    best = load_config(again["best_yaml"])
    assert best.hpo is None and best.train.optim.lr == again["best"]["params"]["train.optim.lr"]
    best_train = next(p for p in plan_pipeline(best) if p.name == "train")
    assert best_train.fingerprint == again["best"]["fingerprint"] == first["best"]["fingerprint"]
    assert best_train.committed
    refs = pipeline_flow(config=best)
    assert all(r["cached"] for r in refs.values()) and refs["train"]["fingerprint"] == best_train.fingerprint

    # and without --fresh the finished study has nothing left to run
    done = hpo_flow(config=config)
    assert len(done["trials"]) == 6 and done["best"] == again["best"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_an_eval_metric_as_the_objective(store, tmp_path):
    """The objective an eval section's number (held-out perplexity of each trial's model): a trial runs the
    training (from cache where the six-trial study above trained the same value) and the eval stage, and
    is judged by the eval artifact's row."""
    from flows.hpo.flow import hpo_flow
    from tasks.artifacts import Artifact

    data = pipeline(
        store,
        tmp_path / "hpo",
        study="by-eval",
        params={"train.optim.lr": {"choices": [2e-2, 3e-2]}},
        sampler="grid",
        n_trials=2,
        objective={"section": "eval", "metric": "perplexity/perplexity"},
    )
    data["eval"] = {"model_from": "train", "perplexity": True}
    out = hpo_flow(config=parse_config(data))
    assert out["counts"] == {"complete": 2} and out["objective"] == "eval: perplexity/perplexity (minimize)"
    search = prepare(parse_config(data))
    for r in out["trials"]:
        planned = {p.name: p for p in plan_pipeline(search.config_for({"train.optim.lr": r["train.optim.lr"]}))}
        rows = Artifact.open(planned["eval"].path).read_table().to_pylist()
        (ppl,) = [x["value"] for x in rows if x["task"] == "perplexity" and x["metric"] == "perplexity"]
        assert r["value"] == ppl and r["fingerprint"] == planned["eval"].fingerprint
    assert out["best"]["value"] == min(r["value"] for r in out["trials"])


@pytest.mark.slow
def test_a_killed_study_resumes_and_finishes_with_the_same_number_of_distinct_trials(store, tmp_path, prefect_server):
    """`kiln hpo` against the real Prefect server, the study on the server's PostgreSQL, two trials at once
    (one CPU core each), killed with SIGKILL while a trial trains: the rerun marks the dead process's
    trials failed, runs them again with their values, and ends with as many distinct finished trials as
    the budget, like a study never killed."""
    import optuna

    from flows.server import shared_database_url

    data = pipeline(
        store,
        tmp_path / "hpo",
        study="killed",
        params={"train.optim.lr": {"low": 1e-3, "high": 5e-2, "log": True}},
        sampler="random",
        n_trials=4,
        parallel=2,
        pruner={"kind": "none"},
        storage="server",
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**prefect_server.env, "KILN_SERVER_DIR": prefect_server.data}
    url = shared_database_url("optuna", directory=prefect_server.data)
    cmd = [sys.executable, "-m", "flows.cli", "hpo", str(path)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            if "killed" in optuna.get_all_study_names(url):
                states = [t.state.name for t in optuna.load_study(study_name="killed", storage=url).trials]
                if "COMPLETE" in states and "RUNNING" in states:
                    break
            time.sleep(1)
        else:
            raise AssertionError("no trial finished: " + (tmp_path / "first.log").read_text()[-3000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # the killed process's launchers and ranks die with it: nothing trains into the store any more
    import psutil

    deadline = time.monotonic() + 30
    while any(str(store) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "a rank outlived the killed study"
        time.sleep(0.5)
    killed = optuna.load_study(study_name="killed", storage=url).trials
    running = [t for t in killed if t.state.name == "RUNNING"]
    assert running

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = optuna.load_study(study_name="killed", storage=url).trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and len({t.params["train.optim.lr"] for t in done}) == 4
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert {t.number for t in failed} == {t.number for t in running}
    for t in failed:  # each ran again with its values, and that run finished
        (retry,) = [d for d in done if d.system_attrs.get("failed_trial") == t.number]
        assert retry.params == t.params
    assert "retry of trial" in r.stdout or "queued to run again" in r.stdout + r.stderr
