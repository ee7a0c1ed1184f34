"""The Prefect layer: cached reruns, stale-cache protection, stage selection, retries, unit resume."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from flows.config import PipelineConfig
from flows.pipeline import pipeline
from tasks.artifacts import Artifact, ArtifactWriter, read_unit
from tasks.ingest import IngestConfig
from tasks.stage import Stage, StageConfig
from tasks.table import register_stage

from train_fixtures import TINY_LLAMA

pytestmark = pytest.mark.usefixtures("prefect_harness")


def task_states(flow_state) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        )
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.name, []).append(r.state.name)
    return out


def config(tmp_path, corpus) -> PipelineConfig:
    return PipelineConfig(
        store={"root": str(tmp_path / "store")}, ingest=IngestConfig(paths=[str(corpus)], unit_files=1)
    )


def test_second_run_is_cached_and_deleted_artifact_is_recomputed(tmp_path, corpus):
    cfg = config(tmp_path, corpus)
    s1 = pipeline(config=cfg, return_state=True)
    refs = s1.result()
    assert refs["ingest"]["cached"] is False
    states = task_states(s1)
    assert states["ingest"] == ["Completed"]
    assert sorted(states) == ["ingest", "ingest[0]", "ingest[1]", "ingest[2]"]  # one unit per file
    art = Artifact.open(refs["ingest"]["path"])
    assert art.stats.rows_in == art.stats.rows_out + art.stats.rows_rejected == 28

    s2 = pipeline(config=cfg, return_state=True)
    assert s2.result()["ingest"]["cached"] is True
    assert task_states(s2) == {"ingest": ["Cached"]}

    shutil.rmtree(refs["ingest"]["path"])  # Prefect's cache still holds the ref to the deleted path
    s3 = pipeline(config=cfg, return_state=True)
    assert s3.result()["ingest"]["cached"] is False
    assert task_states(s3)["ingest"] == ["Completed"]
    assert Artifact.open(refs["ingest"]["path"]).read_table().equals(art.read_table())

    s4 = pipeline(config=cfg, refresh=["ingest"], return_state=True)
    assert task_states(s4)["ingest"] == ["Completed"] and len(task_states(s4)) == 4
    s5 = pipeline(config=cfg, from_stage="ingest", return_state=True)
    assert task_states(s5)["ingest"] == ["Completed"]


def test_stats_table_artifact_is_published(tmp_path, corpus):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    pipeline(config=config(tmp_path, corpus))
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-stats"])))
    assert arts and arts[0].type == "table"
    table = arts[0].data if isinstance(arts[0].data, list) else __import__("json").loads(arts[0].data)
    metrics = {row["metric"]: row["value"] for row in table}
    assert metrics["rows in"] == 28 and metrics["rejected: invalid_json"] == 1
    with get_client(sync_client=True) as client:
        reports = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-report"])))
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-progress"]))
        )
    md = reports[0].data
    assert reports[0].type == "markdown" and "| invalid_json | 1 |" in md and "## Dropped (first rows)" in md
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0


class FlakyConfig(StageConfig):
    marker_dir: str
    fail_unit: int = 1
    failures: int = 1


class FlakyStage(Stage):
    """Copies its input; unit `fail_unit` raises until it has failed `failures` times (counted on disk)."""

    name = "flaky_copy"
    version = 1
    Config = FlakyConfig

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: FlakyConfig, out: ArtifactWriter) -> None:
        os.makedirs(cfg.marker_dir, exist_ok=True)
        calls = os.path.join(cfg.marker_dir, f"unit-{unit['shard']}")
        with open(calls, "a") as f:
            f.write("x")
        if unit["shard"] == cfg.fail_unit and os.path.getsize(calls) <= cfg.failures:
            raise RuntimeError(f"planted failure in unit {unit['shard']}")
        for batch in read_unit(inputs[unit["input"]], unit, stats=out.stats):
            out.write(batch)


def run_flaky(tmp_path, corpus, **flaky):
    from prefect import flow

    from flows.plan import PlannedStage, plan_pipeline, store_for
    from flows.stages import run_planned_stage

    register_stage(FlakyStage())
    cfg = config(tmp_path, corpus)
    ingest = plan_pipeline(cfg)[0]
    fcfg = FlakyConfig(marker_dir=str(tmp_path / "calls"), **flaky)
    fp = FlakyStage().fingerprint(fcfg, [ingest.fingerprint])
    planned = PlannedStage(
        "flaky_copy",
        "flaky_copy",
        "flaky_copy",
        FlakyStage(),
        fcfg,
        ["ingest"],
        ["docs"],
        fp,
        store_for(cfg).path("flaky_copy", fp),
        False,
    )

    @flow
    def two_stages():
        from flows.data import run_data_stages

        refs = run_data_stages(cfg)
        return run_planned_stage(planned, cfg, [refs["ingest"]], refresh=False)

    return two_stages(return_state=True)


def calls(tmp_path) -> dict[str, int]:
    d = tmp_path / "calls"
    return {n: os.path.getsize(d / n) for n in sorted(os.listdir(d))}


def test_task_retries_with_backoff(tmp_path, corpus):
    state = run_flaky(tmp_path, corpus, retries=2, retry_delay_seconds=0.1, failures=2)
    assert state.is_completed()
    assert calls(tmp_path) == {"unit-0": 1, "unit-1": 3, "unit-2": 1}
    assert state.result()["rows"] == 22


def test_failed_stage_rerun_redoes_only_unfinished_units(tmp_path, corpus):
    state = run_flaky(tmp_path, corpus, retries=0, failures=1)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="planted failure"):
        state.result()
    first = calls(tmp_path)
    assert first["unit-1"] == 1
    state = run_flaky(tmp_path, corpus, retries=0, failures=1)
    assert state.is_completed()
    second = calls(tmp_path)
    assert second["unit-1"] == 2  # the failed unit ran again
    assert all(second[u] == first[u] for u in first if u != "unit-1")  # finished units were not redone


@pytest.mark.slow
def test_training_in_the_flow_reports_progress_logs_and_loss_curve(tmp_path):
    """ingest -> tokenizer -> tokenize -> pack -> train inside a Prefect flow: the ranks' output reaches the
    task's log, a progress artifact fills to 100 %, and the report carries the loss curve."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId

    from conftest import REPO

    cfg = PipelineConfig.model_validate(
        {
            "store": {"root": str(tmp_path / "store")},
            "ingest": {"paths": [os.path.join(REPO, "examples", "data")]},
            "tokenizer": {"vocab_size": 512},
            "tokenize": {},
            "pack": {"seq_len": 64},
            "train": {
                "model": {"init": TINY_LLAMA},
                "max_steps": 6,
                "micro_batch_size": 2,
                "eval_every": 3,
                "eval_batches": 1,
                "log_every": 1,
                "save_every": 6,
            },
        }
    )
    state = pipeline(config=cfg, return_state=True)
    refs = state.result()
    assert set(refs) == {"ingest", "tokenizer", "tokenize", "pack", "train"}
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-unit-progress", "train-report"]))
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    progress = next(a for a in arts if a.key == "train-unit-progress")
    assert float(progress.data) == 100.0
    report = next(a for a in arts if a.key == "train-report")
    assert "![loss curve](data:image/png;base64," in report.data
    messages = "\n".join(entry.message for entry in logs)
    assert '"kiln": "train"' in messages and "launching 2 rank(s)" in messages

    from flows.data import data_flow
    from flows.train import train_flow

    assert set(data_flow(config=cfg)) == {"ingest", "tokenizer", "tokenize", "pack"}  # the data flow stops at pack
    again = train_flow(config=cfg, return_state=True)
    assert again.result()["train"]["cached"] is True and task_states(again) == {"train": ["Cached"]}


@pytest.mark.slow
def test_two_training_sections_the_second_starts_from_the_first(tmp_path):
    """A pretraining run and an SFT run that starts from its model, as two sections of one pipeline: the
    SFT run's fingerprint chains the pretraining run's, the model it starts from is the first run's export,
    and a rerun of the pipeline is all cached."""
    import json

    from flows.plan import plan_pipeline
    from flows.train import train_flow

    from conftest import REPO, write_jsonl

    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"instruction": f"Repeat the word {w}.", "output": f"{w} {w}"}
            for w in ("module", "function", "class", "string", "list", "value")
        ]
        * 4,
    )
    cfg = PipelineConfig.model_validate(
        {
            "store": {"root": str(tmp_path / "store")},
            "ingest": {"paths": [os.path.join(REPO, "examples", "data")]},
            "sft_ingest": {"paths": [sft]},
            "tokenizer": {"vocab_size": 512},
            "tokenize": {},
            "sft_tokenize": {"template": "alpaca"},
            "pack": {"seq_len": 64, "inputs": {"sft_tokenize": None}},  # pretraining text only
            "sft_pack": {"kind": "pack", "seq_len": 256, "validation_fraction": 0.2, "inputs": {"tokenize": None}},
            "train": {
                "model": {"init": TINY_LLAMA},
                "max_steps": 4,
                "micro_batch_size": 2,
                "eval_every": 4,
                "eval_batches": 1,
                "save_every": 4,
            },
            "sft": {
                "kind": "train",
                "objective": "sft",
                "model": {"from": "train"},
                "inputs": {"data": "sft_pack"},
                "max_steps": 3,
                "micro_batch_size": 2,
                "eval_every": 3,
                "eval_batches": 1,
                "save_every": 3,
                # a learning rate below float32 resolution: the weights stay where the run started
                "optim": {"lr": 1e-30, "warmup_steps": 0},
                "export": "last",
            },
        }
    )
    planned = {p.name: p for p in plan_pipeline(cfg)}
    assert planned["sft"].inputs == ["sft_pack", "tokenizer", "train"] and planned["sft"].kind == "train"
    assert planned["sft_pack"].inputs == ["sft_tokenize"] and planned["pack"].inputs == ["tokenize"]
    assert [p for p in planned].index("sft") > [p for p in planned].index("train")
    refs = pipeline(config=cfg)
    assert {"train", "sft", "pack", "sft_pack"} <= set(refs)
    sft_art = Artifact.open(refs["sft"]["path"])
    assert {i["slot"]: i["fingerprint"] for i in sft_art.manifest["inputs"]}["model"] == refs["train"]["fingerprint"]
    run = json.load(open(os.path.join(sft_art.path, "metrics.json")))
    assert run["objective"] == "sft" and run["steps"] == 3
    # the second run started from the first run's weights (and, at this learning rate, kept them)
    from safetensors.torch import load_file

    first = load_file(os.path.join(refs["train"]["path"], "model.safetensors"))
    second = load_file(os.path.join(sft_art.path, "model.safetensors"))
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)

    again = pipeline(config=cfg, return_state=True)
    assert all(r["cached"] for r in again.result().values())
    assert all(v == ["Cached"] for v in task_states(again).values())
    models = train_flow(config=cfg)
    assert set(models) == {"train", "sft"} and all(r["cached"] for r in models.values())


def test_the_data_flow_takes_the_stages_that_use_no_model_and_the_train_flow_the_rest(tmp_path):
    """The demo's graph split in two: the corpus, its datasets and ready-made pairs on one side; training,
    sampling, scoring, what reads their output (pairs, feedback, their tokenization), RL and evaluation
    on the other."""
    from flows.config import load_config
    from flows.plan import data_stage_names, plan_pipeline

    from train_fixtures import make_tokenizer

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.yaml"))
    planned = plan_pipeline(cfg)
    data = data_stage_names(planned)
    assert {"crawl", "ingest", "clean", "dedup", "langid", "tokenize", "pack", "sft_pack", "prompts", "heldout"} <= data
    model_half = {p.name for p in planned} - data
    assert {"train", "sft", "simpo.r1.generate", "simpo.r1.pairs", "rm_feedback", "rm_pairs", "ppo"} <= model_half
    assert {"eval_base", "eval_compare", "simpo.report"} <= model_half
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with_pairs = PipelineConfig.model_validate(
        {
            "store": {"root": str(tmp_path)},
            "pref_ingest": {"paths": [str(tmp_path)]},
            "pref_tokenize": {
                "tokenizer": make_tokenizer(str(tmp_path / "tok")).path,
                "inputs": {"pairs": "pref_ingest"},
            },
        }
    )
    assert data_stage_names(plan_pipeline(with_pairs)) == {"pref_ingest", "pref_tokenize"}
