"""Config validation: bad configs are refused before work starts, naming the file and the field."""

from __future__ import annotations

import pytest

from flows.config import ConfigError, PipelineConfig, load_config
from flows.plan import plan_pipeline, select
from tasks.ingest import IngestConfig


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ingest:\n  paths: [a]\n  txt_field: body\n", "ingest.txt_field: unknown field"),
        ("ingest: {}\n", "ingest.paths: Field required"),
        ("ingest:\n  paths: []\n", "ingest.paths: List should have at least 1 item"),
        ("ingest:\n  paths: [a]\n  format: xml\n", "ingest.format: Input should be"),
        ("store:\n  shard_rows: -1\n", "store.shard_rows: Input should be greater than or equal to 1"),
        ("runtime:\n  task_runner: spark\n", "runtime.task_runner"),
        ("bogus: 1\n", "bogus: unknown field"),
        ("ingest:\n  paths: [a\n", "not valid YAML"),
        ("- a\n- b\n", "a pipeline config is a mapping"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and expected in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.yaml"))


def test_missing_input_path_refused_at_plan_time(tmp_path):
    path = write(tmp_path, f"ingest:\n  paths: [{tmp_path}/missing.jsonl]\n")
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"p.yaml: ingest.paths\[0\]: no such file or directory"):
        plan_pipeline(cfg, path)


def test_no_stage_configured(tmp_path):
    with pytest.raises(ConfigError, match="no stage is configured"):
        plan_pipeline(load_config(write(tmp_path, "name: x\n")), "x.yaml")


def test_whitespace_and_key_order_do_not_change_fingerprints(tmp_path, corpus):
    a = write(tmp_path, f"ingest:\n  paths: [{corpus}]\n  text_field: text\nname: a\n")
    b = tmp_path / "b.yaml"
    b.write_text(f"name:   a\n\ningest:   {{text_field: text,   paths: ['{corpus}']}}\n")
    pa_, pb = plan_pipeline(load_config(a)), plan_pipeline(load_config(str(b)))
    assert pa_[0].fingerprint == pb[0].fingerprint


def test_every_content_field_changes_the_fingerprint_and_execution_fields_do_not(corpus):
    from tasks.ingest import IngestStage

    stage = IngestStage()
    base = IngestConfig(paths=[str(corpus)])
    fp = stage.fingerprint(base, [])
    changes = {
        "format": "jsonl",
        "text_extensions": [".txt"],
        "text_field": "body",
        "id_field": "key",
        "url_field": "link",
        "lang_field": "language",
        "source": "label",
        "csv_delimiter": ";",
    }
    content_fields = (
        set(IngestConfig.model_fields) - IngestConfig.execution_fields - IngestConfig.wiring_fields - {"paths"}
    )
    assert set(changes) == content_fields, "a new config field needs a fingerprint test"
    for k, v in changes.items():
        assert stage.fingerprint(base.model_copy(update={k: v}), []) != fp, k
    assert stage.fingerprint(base, ["upstream"]) != fp
    for k, v in {
        "retries": 9,
        "retry_delay_seconds": 1.0,
        "batch_rows": 7,
        "unit_mb": 1,
        "unit_files": 2,
        "kind": "ingest",
        "inputs": {"docs": "x"},
    }.items():
        assert stage.fingerprint(base.model_copy(update={k: v}), []) == fp, k


def test_select_flags(tmp_path, corpus):
    planned = plan_pipeline(PipelineConfig(ingest=IngestConfig(paths=[str(corpus)])))
    chosen, forced = select(planned, None, "ingest", [])
    assert [p.name for p in chosen] == ["ingest"] and forced == {"ingest"}
    with pytest.raises(ConfigError, match="--only clean: not an enabled stage"):
        select(planned, "clean", None, [])
    with pytest.raises(ConfigError, match="--refresh nope"):
        select(planned, None, None, ["nope"])


def test_pipeline_config_json_schema_for_deployments():
    schema = PipelineConfig.model_json_schema()
    # further sections are allowed as objects (each must name its kind; pydantic checks them fully)
    assert schema["additionalProperties"]["type"] == "object" and schema["additionalProperties"]["required"] == ["kind"]
    ingest = schema["$defs"]["IngestConfig"]
    assert ingest["additionalProperties"] is False and "description" in ingest["properties"]["paths"]
