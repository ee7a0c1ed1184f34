"""Every `kiln` command, as a user types it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.artifacts import Artifact

runner = CliRunner()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kiln(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False, terminal_width=200)


def pipeline_yaml(tmp_path, corpus, name="p.yaml", extra=""):
    p = tmp_path / name
    p.write_text(f"name: t\nstore:\n  root: {tmp_path / 'store'}\ningest:\n  paths: [{corpus}]\n{extra}")
    return str(p)


def test_stage_ingest_writes_shards_manifest_and_rejects(tmp_path, corpus):
    out = tmp_path / "out"
    r = kiln(
        "stage",
        "ingest",
        "--input",
        str(corpus / "bad.jsonl"),
        "--input",
        str(corpus / "good.jsonl"),
        "--output",
        str(out),
        "--set",
        "batch_rows=2",
    )
    assert r.exit_code == 0, r.output
    assert "27 rows in, 21 kept, 6 rejected" in r.output
    art = Artifact.open(str(out))
    assert art.num_rows == 21 and set(art.read_table().column("id").to_pylist()) >= {"kept", "doc-0"}
    rejects = art.read_table(table="rejects")
    assert rejects.num_rows == 6 and "reason" in rejects.column_names
    assert sorted(os.listdir(out / "rejects"))[0].endswith(".parquet")
    # an existing artifact is not overwritten by accident
    r = kiln("stage", "ingest", "--input", str(corpus), "--output", str(out))
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = kiln("stage", "ingest", "--input", str(corpus), "--output", str(out), "--overwrite")
    assert r.exit_code == 0 and Artifact.open(str(out)).num_rows == 22


def test_stage_with_config_file_and_bad_settings(tmp_path, corpus):
    (tmp_path / "alt.jsonl").write_text('{"body": "text under another key", "key": "k1"}\n')
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("ingest:\n  text_field: body\n  id_field: key\n")
    out = tmp_path / "o"
    r = kiln("stage", "ingest", "-i", str(tmp_path / "alt.jsonl"), "-o", str(out), "--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert Artifact.open(str(out)).read_table().column("id").to_pylist() == ["k1"]
    r = kiln("stage", "ingest", "-i", str(corpus), "-o", str(tmp_path / "o2"), "--set", "text_feld=x")
    assert r.exit_code == 2 and "text_feld: unknown field" in r.output
    r = kiln("stage", "ingest", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o3"))
    assert r.exit_code == 2 and "ingest.paths[0]: no such file" in r.output
    r = kiln("stage", "polish", "-i", str(corpus), "-o", str(tmp_path / "o4"))
    assert r.exit_code == 2 and "unknown stage 'polish'" in r.output


def test_stage_on_loose_files_ingests_first_and_keeps_ids(tmp_path, corpus):
    out = tmp_path / "langid-out"
    r = kiln("stage", "langid", "-i", str(corpus / "good.jsonl"), "-o", str(out), "--set", "min_score=0.0")
    assert r.exit_code == 0, r.output
    art = Artifact.open(str(out))
    assert art.stage == "langid" and art.stats.rows_in == 20
    rows = art.read_table().to_pylist() + art.read_table(table="rejects").to_pylist()
    assert {r["id"] for r in rows} == {f"doc-{i}" for i in range(20)}
    assert all(r["lang"] for r in rows)


def test_inspect_artifact_plain_parquet_and_missing(tmp_path, corpus):
    out = tmp_path / "out"
    assert kiln("stage", "ingest", "-i", str(corpus), "-o", str(out)).exit_code == 0
    r = kiln("inspect", str(out), "-n", "2")
    assert r.exit_code == 0
    assert "ingest v1" in r.output and "rows_in" in r.output and "rejected: invalid_json" in r.output
    assert "row 1" in r.output and "id:" in r.output
    r = kiln("inspect", str(out), "--rejects", "-n", "10")
    assert "reason: invalid_utf8" in r.output
    r = kiln("inspect", str(out), "--json")
    assert json.loads(r.output)["stats"]["rows_out"] == 22
    shard = out / Artifact.open(str(out)).manifest["shards"][0]
    r = kiln("inspect", str(shard))
    assert r.exit_code == 0 and "plain Parquet" in r.output
    r = kiln("inspect", str(tmp_path / "nothing"))
    assert r.exit_code == 2 and "no artifact" in r.output


def test_stages_and_gc(tmp_path, corpus):
    from flows.config import load_config
    from flows.plan import plan_pipeline, store_for
    from tasks.ingest import IngestConfig, IngestStage
    from tasks.stage import run_in_store

    cfg_path = pipeline_yaml(tmp_path, corpus)
    r = kiln("stages", cfg_path)
    assert r.exit_code == 0 and "to run" in r.output
    cfg = load_config(cfg_path)
    planned = plan_pipeline(cfg)[0]
    run_in_store(IngestStage(), cfg.ingest, [], store_for(cfg))
    r = kiln("stages", cfg_path)
    assert "cached" in r.output and planned.fingerprint in r.output
    # an artifact no pipeline references, and a stale unfinished write
    orphan = run_in_store(IngestStage(), IngestConfig(paths=[str(corpus / "good.jsonl")]), [], store_for(cfg))
    stale = tmp_path / "store" / "ingest" / ".staging-deadbeef"
    stale.mkdir()
    os.utime(stale, (0, 0))
    r = kiln("gc", cfg_path, "--dry-run")
    assert r.exit_code == 0 and "would remove" in r.output and os.path.exists(orphan.path)
    r = kiln("gc", cfg_path)
    assert r.exit_code == 0 and "kept 1 referenced" in r.output
    assert not os.path.exists(orphan.path) and not stale.exists()
    assert os.path.exists(planned.path)


def test_bad_config_refused_before_any_work(tmp_path, corpus):
    bad = pipeline_yaml(tmp_path, corpus, extra="  txt_field: body\n")
    for cmd in (["run", bad], ["stages", bad], ["gc", bad]):
        r = kiln(*cmd)
        assert r.exit_code == 2 and f"{bad}: invalid pipeline config" in r.output and "ingest.txt_field" in r.output
    assert not (tmp_path / "store").exists()
    r = kiln("run", pipeline_yaml(tmp_path, corpus, name="ok.yaml"), "--only", "clean")
    assert r.exit_code == 2 and "--only clean: not an enabled stage" in r.output
    r = kiln("run", pipeline_yaml(tmp_path, corpus, name="ok.yaml"), "--set", "store.shard_rows=zero")
    assert r.exit_code == 2 and "store.shard_rows" in r.output and "--set" in r.output


@pytest.mark.slow
def test_kiln_run_twice_then_cached_and_refresh(tmp_path, corpus):
    """The real CLI in a subprocess, with its embedded Prefect API, as `make demo` runs it."""
    cfg = pipeline_yaml(tmp_path, corpus)
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)

    def run(*extra):
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", cfg, *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    r1 = run()
    assert r1.returncode == 0, r1.stdout + r1.stderr
    assert "ingest │ ran" in r1.stdout and "invalid_json 1" in r1.stdout
    r2 = run()
    assert r2.returncode == 0, r2.stderr
    assert "ingest │ cached" in r2.stdout
    assert "Error logging to API" not in r2.stderr
    r3 = run("--refresh", "ingest")
    assert r3.returncode == 0 and "ingest │ ran" in r3.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """`make demo`'s command: crawl the local pydoc site and the code tree, ingest, clean, dedup, langid,
    tokenize, pack and train, with the validation loss falling; SFT, SimPO rounds with the rule's mean
    rising, a reward model and PPO with its reward rising; then the same again, all cached."""
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    cmd = [
        sys.executable,
        "examples/docs_site.py",
        "run",
        "--port",
        "8765",
        "--",
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "configs/demo.yaml",
        "--set",
        f"store.root={tmp_path}/store",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    out = r.stdout
    for stage in ("crawl", "ingest", "clean", "dedup", "langid", "tokenizer", "tokenize", "pack", "train"):
        assert f"{stage}: {tmp_path}/store/{stage}/" in out, stage
    crawl = next(
        Artifact.open(os.path.join(tmp_path, "store", "crawl", d))
        for d in os.listdir(tmp_path / "store" / "crawl")
        if not d.startswith(".")
    )
    assert crawl.stats.extra.get("web_requests", 0) >= 200 and crawl.stats.extra.get("code_files", 0) >= 20
    line = next(ln for ln in out.splitlines() if "validation loss" in ln)
    first, last = (float(x) for x in line.split("validation loss ")[1].split(" (")[0].split(" -> "))
    assert last < first
    # the preference loop's rule-based reward rises over the rounds, and PPO's reward-model score with it
    for marker in ("mean score of fresh samples ", "mean reward "):
        line = next(ln for ln in out.splitlines() if marker in ln)
        first, last = (float(x) for x in line.split(marker)[1].split(";")[0].split(",")[0].split(" -> "))
        assert last > first, line
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and " ran " not in r2.stdout and r2.stdout.count("cached") >= 12


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_cluster_task_runners_give_the_same_artifact(tmp_path, corpus, runner):
    """Units spread over a local Dask or Ray cluster (worker processes) produce the one-process artifact."""
    from flows.config import load_config
    from flows.plan import plan_pipeline, store_for
    from tasks.ingest import IngestStage
    from tasks.stage import run_in_store

    cfg_path = pipeline_yaml(tmp_path, corpus, extra="  unit_files: 1\n")
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            cfg_path,
            "--set",
            f"runtime.task_runner={runner}",
            "--set",
            "runtime.workers=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ingest │ ran" in r.stdout
    cfg = load_config(cfg_path)
    planned = plan_pipeline(cfg)[0]
    dask_art = Artifact.open(planned.path)
    assert dask_art.manifest["units"] == 3
    local = run_in_store(
        IngestStage(),
        cfg.ingest,
        [],
        store_for(cfg.model_copy(update={"store": cfg.store.model_copy(update={"root": str(tmp_path / "local")})})),
    )
    assert local.fingerprint == dask_art.fingerprint
    assert local.read_table().equals(dask_art.read_table())


@pytest.mark.slow
def test_kiln_run_on_a_grown_corpus_says_what_it_copied(tmp_path):
    """The run summary and `kiln inspect` say, per stage, how many units came from which earlier artifact."""
    from test_incremental import Writer

    from conftest import write_jsonl

    w = Writer()
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "n1.jsonl", [w.fresh(f"a{i}") for i in range(120)])
    cfg = tmp_path / "grow.yaml"
    cfg.write_text(
        f"name: grow\nstore:\n  root: {tmp_path / 'store'}\n  shard_rows: 160\ningest:\n  paths: [{corpus}]\n"
        "clean: {}\ndedup: {}\n"
    )
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)

    def run():
        r = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    first = run()
    assert re.search(r"clean\s*│ ran\s*│\s*-\s*│", first) and "units copied from" not in first
    (first_clean,) = os.listdir(tmp_path / "store" / "clean")
    write_jsonl(corpus / "n2.jsonl", [w.fresh(f"b{i}") for i in range(30)] + [w.exact("b-copy", "a5")])
    second = run()
    copied = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"(\w+)\s*│ ran\s*│\s*(\d+)/(\d+)", second)}
    before = Artifact.open(str(tmp_path / "store" / "clean" / first_clean)).manifest["units"]
    for stage in ("clean", "minhash", "dedup"):  # the first night's shards (but its last, had the new file extended it)
        assert copied[stage][0] >= max(4, before - 1), (stage, copied, before)
    assert f"units copied from {first_clean}" in second
    assert "continued the judgement of" in second  # dedup_clusters took the first night's judgement
    (second_clean,) = set(os.listdir(tmp_path / "store" / "clean")) - {first_clean}
    shown = kiln("inspect", str(tmp_path / "store" / "clean" / second_clean)).stdout
    assert (
        f"taken from earlier artifacts: {copied['clean'][0]} of {copied['clean'][1]} units copied from {first_clean}"
        in shown
    )
