"""The tokenizer, sft_ingest and tokenize stages: a real BPE trained on the repo's text, real HF loading,
instruction formatting with masked prompts, and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pytest
from pydantic import ValidationError

from tasks.artifacts import Artifact, ArtifactStore
from tasks.documents import DOCUMENT_SCHEMA
from tasks.ingest import IngestConfig, IngestStage, SftIngestConfig, SftIngestStage
from tasks.stage import StageInputError, run_in_store
from tasks.tokenize import (
    IGNORE_INDEX,
    TokenizeConfig,
    TokenizerConfig,
    TokenizerStage,
    TokenizeStage,
)

from conftest import write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCSTRINGS = os.path.join(REPO, "examples", "data", "stdlib_docstrings.jsonl")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_docs(store: ArtifactStore, rows: list[dict], name: str = "docs") -> Artifact:
    """A documents artifact with exactly these rows, nulls included (as another producer might write:
    ingest itself never would)."""
    schema = pa.schema([f.with_nullable(True) for f in DOCUMENT_SCHEMA])
    cols = {f: [r.get(f) for r in rows] for f in schema.names}
    cols["source"] = [r.get("source", "test") for r in rows]
    batch = pa.RecordBatch.from_pydict(cols, schema=schema)
    fp = f"{name}-{abs(hash(json.dumps(rows, sort_keys=True))) % 10**12}"
    staging = store.staging(name, fp)
    writer = staging.begin_unit(0)
    writer.write(batch)
    writer.stats.rows_in = len(rows)
    staging.finish_unit(0, writer)
    return staging.commit({"stage": name, "stage_version": 1, "fingerprint": fp, "config": {}, "inputs": []}, 1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Real documents (the stdlib docstrings shipped in examples/) and a BPE trained on them."""
    root = tmp_path_factory.mktemp("tok")
    store = ArtifactStore(str(root / "store"))
    docs = run_in_store(IngestStage(), IngestConfig(paths=[DOCSTRINGS]), [], store)
    tok = run_in_store(
        TokenizerStage(),
        TokenizerConfig(
            vocab_size=600,
            extra_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
            chat_template=CHAT_TEMPLATE,
        ),
        [docs],
        store,
    )
    return {"root": root, "store": store, "docs": docs, "tok": tok}


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# --------------------------------------------------------------------------------------------------
# tokenizer stage


def test_trained_tokenizer_is_a_loadable_deterministic_artifact(base, tmp_path):
    art = base["tok"]
    hf = load(art.path)
    info = art.manifest["tokenizer"]
    assert len(hf) == info["vocab_size"] == 600
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert info["eos_token_id"] == hf.eos_token_id and info["has_chat_template"]
    text = "Byte-level BPE: any text round-trips, even ünïcödé and emoji 🙂."
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    vocab = art.read_table()
    assert vocab.num_rows == 600 and vocab.column("special").to_pylist().count(True) == 7
    assert art.stats.rows_in == art.stats.rows_out == base["docs"].num_rows
    # trained again elsewhere: byte-identical files, same fingerprint
    again = run_in_store(
        TokenizerStage(), TokenizerConfig(**art.manifest["config"]), [base["docs"]], ArtifactStore(str(tmp_path / "s2"))
    )
    assert again.fingerprint == art.fingerprint
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(art.path, name), "rb") as a, open(os.path.join(again.path, name), "rb") as b:
            assert a.read() == b.read()
    # a different vocabulary size is a different tokenizer
    assert TokenizerStage().fingerprint(TokenizerConfig(vocab_size=601), [base["docs"].fingerprint]) != art.fingerprint


def test_the_tokenizer_stage_output_loads_as_autotokenizer_would_without_torch(base, tmp_path):
    """load_tokenizer takes the generic fast class directly for the tokenizer stage's output (no torch
    import): the same class, vocabulary, special tokens, chat template and encodings as AutoTokenizer."""
    import subprocess
    import sys

    from tasks.tokenize.hf import _generic_fast, load_tokenizer

    path = base["tok"].path
    assert _generic_fast(path)
    direct, auto = load_tokenizer(path, "tokenizer"), load(path)
    assert type(direct) is type(auto) and len(direct) == len(auto) and direct.get_vocab() == auto.get_vocab()
    assert direct.special_tokens_map == auto.special_tokens_map and direct.chat_template == auto.chat_template
    assert direct.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    text = "A docstring, <|eos|> inside it, and ünïcödé 🙂.\n\n    indented()"
    assert direct(text)["input_ids"] == auto(text)["input_ids"]
    probe = (
        "import sys; from tasks.tokenize.hf import load_tokenizer; "
        f"load_tokenizer({path!r}, 'tokenizer'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
    # a model directory (config.json beside the tokenizer) is left to AutoTokenizer
    shutil.copytree(path, tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not _generic_fast(str(tmp_path / "model"))


def test_tokenizer_path_errors_name_the_field(tmp_path):
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(StageInputError, match=r"^path: no such tokenizer directory: .*no-such-tokenizer"):
        TokenizerStage().fingerprint(TokenizerConfig(path=missing), [])
    with pytest.raises(StageInputError, match=r"^tokenizer: no such tokenizer directory: .*no-such-tokenizer"):
        TokenizeStage().fingerprint(TokenizeConfig(tokenizer=missing), ["x"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageInputError, match=r"^path: .*holds no tokenizer"):
        TokenizerStage().fingerprint(TokenizerConfig(path=str(tmp_path / "empty")), [])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(StageInputError, match=r"^path: cannot load a tokenizer from"):
        run_in_store(TokenizerStage(), TokenizerConfig(path=str(broken)), [], ArtifactStore(str(tmp_path / "s")))
    with pytest.raises(ValidationError, match="path and hub_name"):
        TokenizerConfig(path="a", hub_name="b")
    with pytest.raises(ValidationError, match="vocab_siz"):
        TokenizerConfig(vocab_siz=100)
    with pytest.raises(StageInputError, match="^inputs: training a tokenizer needs a documents artifact"):
        run_in_store(TokenizerStage(), TokenizerConfig(), [], ArtifactStore(str(tmp_path / "s")))


def test_loaded_tokenizer_content_is_its_fingerprint(base, tmp_path):
    copy = tmp_path / "mytok"
    shutil.copytree(base["tok"].path, copy, ignore=shutil.ignore_patterns("*.parquet", "_manifest.json"))
    store = ArtifactStore(str(tmp_path / "s"))
    loaded = run_in_store(TokenizerStage(), TokenizerConfig(path=str(copy)), [], store)
    assert loaded.manifest["tokenizer"]["source"] == "path" and len(load(loaded.path)) == 600
    # the documents beside a loaded tokenizer do not change it
    assert (
        TokenizerStage().fingerprint(TokenizerConfig(path=str(copy)), [base["docs"].fingerprint]) == loaded.fingerprint
    )
    tok_fp = TokenizeStage().fingerprint(TokenizeConfig(tokenizer=str(copy)), [base["docs"].fingerprint])
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 4096  # same path, different content
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert TokenizerStage().fingerprint(TokenizerConfig(path=str(copy)), []) != loaded.fingerprint
    assert TokenizeStage().fingerprint(TokenizeConfig(tokenizer=str(copy)), [base["docs"].fingerprint]) != tok_fp


# --------------------------------------------------------------------------------------------------
# tokenize stage, text


def test_tokenize_text_eos_bos_counts_and_roundtrip(base, tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    art = run_in_store(TokenizeStage(), TokenizeConfig(add_bos=True, batch_rows=7), [base["docs"], base["tok"]], store)
    hf = load(base["tok"].path)
    rows = art.read_table().to_pylist()
    texts = {d["id"]: d["text"] for d in base["docs"].read_table().to_pylist()}
    assert len(rows) == len(texts) == art.stats.rows_out == art.stats.rows_in
    for r in rows:
        ids = r["input_ids"]
        assert ids[0] == hf.bos_token_id and ids[-1] == hf.eos_token_id and r["n_tokens"] == len(ids)
        assert hf.eos_token_id not in ids[1:-1] and hf.bos_token_id not in ids[1:]
        assert hf.decode(ids[1:-1]) == texts[r["id"]]
    # the same tokens as the transformers tokenizer gives, batch size notwithstanding
    sample = rows[3]
    assert sample["input_ids"][1:-1] == hf(texts[sample["id"]], add_special_tokens=False)["input_ids"]
    total = sum(r["n_tokens"] for r in rows)
    assert art.manifest["tokens"]["tokens"] == total == art.stats.extra["tokens"]
    assert art.manifest["tokens"]["docs"] == len(rows) and art.manifest["tokens"]["max"] == max(
        r["n_tokens"] for r in rows
    )
    assert art.manifest["tokenizer"]["fingerprint"] == base["tok"].fingerprint
    # same documents, another tokenizer: another fingerprint, so nothing is reused from the cache
    other = run_in_store(TokenizerStage(), TokenizerConfig(vocab_size=500), [base["docs"]], store)
    assert (
        TokenizeStage().fingerprint(TokenizeConfig(add_bos=True), [base["docs"].fingerprint, other.fingerprint])
        != art.fingerprint
    )
    # batch size is an execution detail
    assert (
        TokenizeStage().fingerprint(
            TokenizeConfig(add_bos=True, batch_rows=99), [base["docs"].fingerprint, base["tok"].fingerprint]
        )
        == art.fingerprint
    )


def test_tokenize_bad_documents_are_rejected_with_reasons(base, tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    huge = "The quick brown fox jumps over the lazy dog. " * 1500  # thousands of tokens: 100x a 32-token row
    docs = make_docs(
        store,
        [
            {"id": "ok", "text": "A normal document."},
            {"id": "empty", "text": ""},
            {"id": "blank", "text": " \n\t "},
            {"id": "null", "text": None},
            {"id": None, "text": "no id"},
            {"id": "huge", "text": huge},
            {"id": "forged", "text": "A page about tokens: <|eos|> is not a boundary here."},
        ],
    )
    art = run_in_store(TokenizeStage(), TokenizeConfig(), [docs, base["tok"]], store)
    st = art.stats
    assert st.rows_in == 7 == st.rows_out + st.rows_rejected
    assert st.rejected == {"empty_text": 2, "missing_text": 1, "missing_id": 1}
    rej = {r["reason"]: r for r in art.read_table(table="rejects").to_pylist()}
    assert rej["missing_id"]["text"] == "no id" and rej["missing_text"]["id"] == "null"
    rows = {r["id"]: r for r in art.read_table().to_pylist()}
    eos = base["tok"].manifest["tokenizer"]["eos_token_id"]
    assert rows["huge"]["n_tokens"] > 3200
    assert rows["forged"]["input_ids"].count(eos) == 1  # only the EOS the stage appended
    assert (
        load(base["tok"].path).decode(rows["forged"]["input_ids"][:-1])
        == "A page about tokens: <|eos|> is not a boundary here."
    )


def test_tokenize_needs_a_tokenizer_and_documents(base, tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    with pytest.raises(StageInputError, match="^tokenizer: no tokenizer"):
        run_in_store(TokenizeStage(), TokenizeConfig(), [base["docs"]], store)
    with pytest.raises(StageInputError, match="^tokenizer: no tokenizer"):
        run_in_store(TokenizeStage(), TokenizeConfig(), [base["docs"], base["docs"]], store)
    with pytest.raises(StageInputError, match=r"^inputs\[0\]: .* is a tokenizer; a tokenizer artifact goes last"):
        run_in_store(TokenizeStage(), TokenizeConfig(), [base["tok"], base["docs"], base["tok"]], store)
    with pytest.raises(StageInputError, match="^tokenizer: a tokenizer artifact is an input already"):
        run_in_store(TokenizeStage(), TokenizeConfig(tokenizer=base["tok"].path), [base["docs"], base["tok"]], store)
    with pytest.raises(ValidationError, match="format"):
        TokenizeConfig(format="words")
    # a tokenizer directory as config works as well as the artifact input, with the same tokens
    by_dir = run_in_store(TokenizeStage(), TokenizeConfig(tokenizer=base["tok"].path), [base["docs"]], store)
    by_input = run_in_store(TokenizeStage(), TokenizeConfig(), [base["docs"], base["tok"]], store)
    assert by_dir.read_table().column("input_ids").equals(by_input.read_table().column("input_ids"))
    # documents of several stages (the pipeline's source stages) are read together, a unit per shard
    other = make_docs(store, [{"id": "extra", "text": "One more document."}])
    both = run_in_store(TokenizeStage(), TokenizeConfig(), [base["docs"], other, base["tok"]], store)
    assert both.num_rows == base["docs"].num_rows + 1 and both.manifest["units"] == 2
    assert both.read_table().column("id").to_pylist()[-1] == "extra"


# --------------------------------------------------------------------------------------------------
# instruction data


ALPACA = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Summarise the text.", "input": "Kiln turns raw text into models.", "output": "It trains models."},
    {"instruction": "Say hi.", "output": "Hi!"},  # no input field at all: fine
]
BAD_SFT = [
    {"instruction": "No answer here."},  # missing output
    {"instruction": 42, "output": "x"},  # non-text instruction
    {"instruction": "Bad input type.", "input": ["a", "list"], "output": "x"},
    {"instruction": "Empty answer.", "output": "   "},
    {"messages": "hello"},  # not a list
    {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"text": "a pretraining document is no instruction example"},
]
CHAT = [
    {
        "id": "chat-1",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6."},
        ],
    },
    {
        "id": "sharegpt",
        "conversations_are_here": True,
        "messages": [
            {"from": "human", "value": "Hello?"},
            {"from": "gpt", "value": "Hello."},
        ],
    },
]


@pytest.fixture(scope="module")
def sft_docs(base):
    d = base["root"] / "sft"
    write_jsonl(d / "alpaca.jsonl", ALPACA + BAD_SFT, raw_lines=[b"{broken json"])
    (d / "alpaca_array.json").write_text(json.dumps(ALPACA[:1]))
    write_jsonl(d / "chat.jsonl", CHAT)
    return run_in_store(SftIngestStage(), SftIngestConfig(paths=[str(d)]), [], base["store"])


def test_sft_ingest_validates_records(sft_docs):
    st = sft_docs.stats
    assert st.rows_in == len(ALPACA) + len(BAD_SFT) + 1 + 1 + len(CHAT) == st.rows_out + st.rows_rejected
    assert st.rejected == {
        "missing_field": 1,
        "non_string_field": 3,
        "empty_field": 1,
        "bad_messages": 2,
        "no_assistant_turn": 1,
        "missing_sft_fields": 1,
        "invalid_json": 1,
    }
    details = sorted(r["detail"] for r in sft_docs.read_table(table="rejects").to_pylist())
    assert "'instruction' is a int, not text" in details and "'input' is a list, not text" in details
    assert "messages[0].content is a int, not text" in details and "no 'output' field" in details
    docs = {d["id"]: d for d in sft_docs.read_table().to_pylist()}
    meta = json.loads(docs["chat-1"]["meta"])
    assert meta["sft"]["format"] == "chat" and len(meta["sft"]["messages"]) == 5
    assert json.loads(docs["sharegpt"]["meta"])["sft"]["messages"][1] == {"role": "assistant", "content": "Hello."}
    assert "Paris." in [d["text"].split("\n\n")[-1] for d in docs.values()]


def _target_and_prompt(hf, row):
    target = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    prompt = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(row["input_ids"], row["labels"]))
    return hf.decode(target), hf.decode(prompt)


def test_sft_alpaca_template_masks_the_prompt(base, sft_docs, tmp_path):
    art = run_in_store(
        TokenizeStage(),
        TokenizeConfig(format="sft", template="alpaca"),
        [sft_docs, base["tok"]],
        ArtifactStore(str(tmp_path / "s")),
    )
    hf = load(base["tok"].path)
    assert art.stats.rows_in == sft_docs.num_rows == art.stats.rows_out
    by_text = {}
    for row in art.read_table().to_pylist():
        assert row["input_ids"][-1] == hf.eos_token_id and row["labels"][-1] == hf.eos_token_id
        target, prompt = _target_and_prompt(hf, row)
        by_text[target] = prompt
    assert by_text["Paris.<|eos|>"].endswith("### Instruction:\nName the capital of France.\n\n### Response:\n")
    assert "### Input:\nKiln turns raw text into models." in by_text["It trains models.<|eos|>"]
    assert by_text["4.<|eos|>6.<|eos|>"].startswith("You are terse.\n\n### Instruction:\nWhat is 2+2?")
    assert art.stats.extra["target_tokens"] < art.stats.extra["tokens"]


def test_sft_chat_template_masks_all_but_replies(base, sft_docs, tmp_path):
    art = run_in_store(
        TokenizeStage(),
        TokenizeConfig(format="sft"),
        [sft_docs, base["tok"]],  # auto -> chat template
        ArtifactStore(str(tmp_path / "s")),
    )
    hf = load(base["tok"].path)
    rows = {r["id"]: r for r in art.read_table().to_pylist()}
    target, prompt = _target_and_prompt(hf, rows["chat-1"])
    assert target == "4.<|end|>\n6.<|end|>\n<|eos|>"
    assert prompt == (
        "<|system|>You are terse.<|end|>\n<|user|>What is 2+2?<|end|>\n<|assistant|><|user|>And 3+3?<|end|>\n"
        "<|assistant|>"
    )
    assert (
        hf.decode(rows["chat-1"]["input_ids"])
        == hf.apply_chat_template(CHAT[0]["messages"], tokenize=False) + "<|eos|>"
    )


def test_sft_tokenize_rejects_bad_meta(base, tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    docs = make_docs(
        store,
        [
            {
                "id": "ok",
                "text": "x",
                "meta": json.dumps({"instruction": "Add 1+1.", "output": "2"}),
            },  # raw fields in meta
            {"id": "bad-json", "text": "x", "meta": "{nope"},
            {"id": "no-meta", "text": "x", "meta": None},
            {"id": "not-text", "text": "x", "meta": json.dumps({"sft": {"instruction": "x", "output": {"a": 1}}})},
        ],
    )
    art = run_in_store(TokenizeStage(), TokenizeConfig(format="sft", template="alpaca"), [docs, base["tok"]], store)
    assert art.stats.rejected == {"invalid_meta": 1, "missing_sft_fields": 1, "non_string_field": 1}
    assert art.read_table().column("id").to_pylist() == ["ok"]
    with pytest.raises(StageInputError, match="^template: the tokenizer has no chat template"):
        plain = run_in_store(TokenizerStage(), TokenizerConfig(vocab_size=400), [base["docs"]], store)
        run_in_store(TokenizeStage(), TokenizeConfig(format="sft", template="chat"), [docs, plain], store)


def test_kiln_stage_cli_runs_tokenizer_and_tokenize(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app,
        ["stage", "tokenizer", "-i", DOCSTRINGS, "-o", str(tmp_path / "tok"), "--set", "vocab_size=400"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert len(load(str(tmp_path / "tok"))) == 400
    r = runner.invoke(
        app,
        ["stage", "tokenize", "-i", DOCSTRINGS, "-o", str(tmp_path / "ids"), "--set", f"tokenizer={tmp_path / 'tok'}"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert Artifact.open(str(tmp_path / "ids")).num_rows == 83
    r = runner.invoke(
        app,
        [
            "stage",
            "tokenize",
            "-i",
            DOCSTRINGS,
            "-o",
            str(tmp_path / "x"),
            "--set",
            f"tokenizer={tmp_path / 'missing'}",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 2 and "tokenize.tokenizer: no such tokenizer directory" in r.output


def test_units_run_in_parallel_threads_give_the_same_artifact(base, tmp_path):
    """As Prefect's thread pool runs them: units at once in one process, sharing the loaded tokenizer."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.stage import commit_stage, run_unit

    small = ArtifactStore(str(tmp_path / "small"), shard_rows=10)  # several shards, so several units
    docs = run_in_store(IngestStage(), IngestConfig(paths=[DOCSTRINGS]), [], small)
    stage, cfg, inputs = TokenizeStage(), TokenizeConfig(batch_rows=4), [docs, base["tok"]]
    sequential = run_in_store(stage, cfg, inputs, small)
    units = stage.plan(inputs, cfg)
    assert len(units) == len(docs.shards()) > 4
    store = ArtifactStore(str(tmp_path / "threads"), shard_rows=10)
    staging = store.staging(stage.name, sequential.fingerprint)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda iu: run_unit(stage, cfg, inputs, staging, iu[0], iu[1]), enumerate(units)))
    parallel = commit_stage(stage, cfg, inputs, staging, sequential.fingerprint, len(units))
    assert parallel.read_table().equals(sequential.read_table())
    assert parallel.manifest["tokens"] == sequential.manifest["tokens"]
