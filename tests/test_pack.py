"""The pack stage: no token lost or duplicated, positions restart at every document, the split has no
overlap, instruction examples stay whole with their prompts masked, mixtures are deterministic and
recorded, and the Hugging Face dataset loads."""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict

import pytest
from pydantic import ValidationError

from tasks.artifacts import ArtifactStore
from tasks.ingest import IngestConfig, IngestStage, SftIngestConfig, SftIngestStage
from tasks.pack import MixtureComponent, PackConfig, PackStage
from tasks.pack.binpack import pack_best_fit_decreasing, pack_concat
from tasks.pack.mixture import MixturePart, sampling_rates
from tasks.stage import StageInputError, run_in_store
from tasks.tokenize import (
    TokenizeConfig,
    TokenizerConfig,
    TokenizerStage,
    TokenizeStage,
)

from conftest import write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCSTRINGS = os.path.join(REPO, "examples", "data", "stdlib_docstrings.jsonl")
SEQ = 64
SFT_SEQ = 256  # the Alpaca preamble alone is ~60 tokens of this small vocabulary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tokenized real text (the repo's stdlib docstrings, plus one document 100x a row and some tiny
    ones) and tokenized Alpaca examples (one of them longer than a row), all with one trained BPE."""
    root = tmp_path_factory.mktemp("pack")
    store = ArtifactStore(str(root / "store"))
    with open(DOCSTRINGS) as f:
        records = [json.loads(line) for line in f]
    records.append({"id": "huge", "text": " ".join(r["text"] for r in records)[: 120 * SEQ * 4]})
    records += [{"id": f"tiny-{i}", "text": w} for i, w in enumerate(["a", "ok", "Yes."])]
    text_path = write_jsonl(root / "text.jsonl", records)
    docs = run_in_store(IngestStage(), IngestConfig(paths=[text_path]), [], store)
    tok = run_in_store(TokenizerStage(), TokenizerConfig(vocab_size=500), [docs], store)
    text = run_in_store(TokenizeStage(), TokenizeConfig(batch_rows=16), [docs, tok], store)

    rnd = random.Random(7)
    words = " ".join(r["text"] for r in records[:20]).split()
    examples = [
        {
            "id": f"ex-{i}",
            "instruction": " ".join(rnd.sample(words, rnd.randint(2, 8))),
            "input": "",
            "output": " ".join(rnd.sample(words, rnd.randint(1, 10))),
        }
        for i in range(40)
    ]
    examples.append({"id": "ex-long", "instruction": "Repeat.", "output": " ".join(words[:400])})
    sft_path = write_jsonl(root / "alpaca.jsonl", examples)
    sft_docs = run_in_store(SftIngestStage(), SftIngestConfig(paths=[sft_path]), [], store)
    sft = run_in_store(TokenizeStage(), TokenizeConfig(format="sft"), [sft_docs, tok], store)
    return {"root": root, "store": store, "docs": docs, "text": text, "sft": sft, "tok": tok}


def by_id(art):
    return {r["id"]: r for r in art.read_table().to_pylist()}


def rows_of(art):
    return art.read_table().to_pylist() + art.read_table(table="validation").to_pylist()


def pack(data, tmp_path, inputs=None, **cfg):
    return run_in_store(PackStage(), PackConfig(**cfg), inputs or [data["text"]], ArtifactStore(str(tmp_path / "s")))


def check_rows(rows, seq_len, pad_id):
    """Every row: the layout and position ids the trainer relies on."""
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == seq_len
        used = sum(r["seq_lens"])
        assert r["n_tokens"] == used <= seq_len
        assert len(r["seq_lens"]) == len(r["doc_ids"]) == len(r["doc_offsets"])
        expected_positions = [p for n in r["seq_lens"] for p in range(n)] + list(range(seq_len - used))
        assert r["position_ids"] == expected_positions  # restart at every document and at the padding
        assert r["input_ids"][used:] == [pad_id] * (seq_len - used)
        assert r["labels"][used:] == [-100] * (seq_len - used)
        start = 0
        for n in r["seq_lens"]:  # no document is trained to follow another
            assert r["labels"][start] == -100
            start += n


def reassemble(rows):
    """doc id -> its tokens rebuilt from the pieces of every row; fails on any piece seen twice."""
    pieces = defaultdict(dict)
    for r in rows:
        start = 0
        for doc, offset, n in zip(r["doc_ids"], r["doc_offsets"], r["seq_lens"]):
            assert offset not in pieces[doc], f"piece {doc}@{offset} packed twice"
            pieces[doc][offset] = r["input_ids"][start : start + n]
            start += n
    docs = {}
    for doc, parts in pieces.items():
        tokens = []
        for offset in sorted(parts):
            assert offset == len(tokens), f"gap in {doc} at {offset}"
            tokens += parts[offset]
        docs[doc] = tokens
    return docs


@pytest.mark.parametrize("mode", ["bfd", "concat"])
def test_packing_loses_and_duplicates_no_token(data, tmp_path, mode):
    art = pack(data, tmp_path, seq_len=SEQ, mode=mode, validation_fraction=0.2)
    pad = data["tok"].manifest["tokenizer"]["pad_token_id"]
    rows = rows_of(art)
    check_rows(rows, SEQ, pad)
    expected = {k: r["input_ids"] for k, r in by_id(data["text"]).items()}
    assert reassemble(rows) == expected  # per document: tokens in == tokens out, in order
    assert expected["huge"].__len__() > 100 * SEQ
    st = art.stats
    assert st.rows_in == st.rows_out == len(expected) and st.rows_rejected == 0
    packing = art.manifest["packing"]
    total = sum(len(v) for v in expected.values())
    assert packing["train"]["tokens"] + packing["validation"]["tokens"] == total
    assert packing["train"]["sequences"] == art.num_rows and packing["validation"]["sequences"] == art.table_rows(
        "validation"
    )
    assert 0.9 < packing["train"]["efficiency"] <= 1
    if mode == "bfd":  # only documents longer than a row are split, and those into full rows + one remainder
        split_docs = {d for r in rows for d, o in zip(r["doc_ids"], r["doc_offsets"]) if o > 0}
        assert split_docs == {k for k, v in expected.items() if len(v) > SEQ}
        assert sum(1 for r in rows if r["doc_ids"] == ["huge"] and r["n_tokens"] == SEQ) == len(expected["huge"]) // SEQ


def test_split_is_by_document_deterministic_and_disjoint(data, tmp_path):
    a = pack(data, tmp_path / "a", seq_len=SEQ, validation_fraction=0.3, split_seed=1)
    b = pack(data, tmp_path / "b", seq_len=SEQ, validation_fraction=0.3, split_seed=1, unit_mb=1)
    train = {d for r in a.read_table().to_pylist() for d in r["doc_ids"]}
    val = {d for r in a.read_table(table="validation").to_pylist() for d in r["doc_ids"]}
    assert train and val and not train & val
    assert train | val == set(by_id(data["text"]))
    assert 0.15 < len(val) / len(train | val) < 0.45
    assert a.read_table().equals(b.read_table())  # same config, same rows
    c = pack(data, tmp_path / "c", seq_len=SEQ, validation_fraction=0.3, split_seed=2)
    assert {d for r in c.read_table(table="validation").to_pylist() for d in r["doc_ids"]} != val


def test_saved_hf_dataset_loads_and_matches_parquet(data, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    art = pack(data, tmp_path, seq_len=SEQ, validation_fraction=0.2)
    assert art.manifest["hf_dataset"] == {"path": "hf", "splits": ["train", "validation"]}
    dd = datasets.load_from_disk(os.path.join(art.path, "hf"))
    assert dd["train"].num_rows == art.num_rows and dd["validation"].num_rows == art.table_rows("validation")
    assert dd["train"][0] == art.head(1)[0]
    dd["train"].set_format("torch", columns=["input_ids", "labels", "position_ids"])
    batch = dd["train"][:4]
    assert tuple(batch["input_ids"].shape) == tuple(batch["labels"].shape) == (4, SEQ)
    assert batch["labels"].tolist() == [r["labels"] for r in art.head(4)]
    tok = AutoTokenizer.from_pretrained(os.path.join(art.path, "tokenizer"), local_files_only=True)
    assert len(tok) == 500
    # no validation documents: the DatasetDict has just a train split (datasets cannot load an empty one)
    only_train = pack(data, tmp_path / "t", seq_len=SEQ, validation_fraction=0.0)
    assert list(datasets.load_from_disk(os.path.join(only_train.path, "hf"))) == ["train"]


def test_instruction_examples_stay_whole_with_prompts_masked(data, tmp_path):
    for mode in ("bfd", "concat"):
        art = pack(data, tmp_path / mode, inputs=[data["sft"]], seq_len=SFT_SEQ, mode=mode, validation_fraction=0.1)
        source = by_id(data["sft"])
        rows = rows_of(art)
        check_rows(rows, SFT_SEQ, data["tok"].manifest["tokenizer"]["pad_token_id"])
        assert art.stats.rejected == {"longer_than_seq_len": 1}
        assert art.read_table(table="rejects").column("id").to_pylist() == ["ex-long"]
        seen = set()
        for r in rows:
            start = 0
            for doc, offset, n in zip(r["doc_ids"], r["doc_offsets"], r["seq_lens"]):
                assert offset == 0 and n == source[doc]["n_tokens"] and doc not in seen  # whole, once
                seen.add(doc)
                assert r["input_ids"][start : start + n] == source[doc]["input_ids"]
                assert r["labels"][start : start + n] == source[doc]["labels"]  # prompt -100, reply kept
                start += n
        assert seen == set(source) - {"ex-long"}
        assert art.stats.rows_in == art.stats.rows_out + art.stats.rows_rejected


def test_mixture_weights_caps_and_repeats_are_deterministic_and_recorded(data, tmp_path):
    inputs = [data["text"], data["sft"]]
    text_tokens = data["text"].manifest["tokens"]["tokens"]
    sft_tokens = data["sft"].manifest["tokens"]["tokens"]
    mix = [MixtureComponent(name="web", weight=3), MixtureComponent(name="sft", weight=1)]
    a = pack(data, tmp_path / "a", inputs=inputs, seq_len=SFT_SEQ, mixture=mix)
    b = pack(data, tmp_path / "b", inputs=inputs, seq_len=SFT_SEQ, mixture=mix)
    assert a.read_table().equals(b.read_table())
    plan = a.manifest["mixture"]
    # the scarcer dataset relative to its weight is taken whole, the other subsampled to a 3:1 ratio
    assert plan["sft"]["rate"] == 1.0 and plan["web"]["rate"] == pytest.approx(3 * sft_tokens / text_tokens)
    extra = a.stats.extra
    assert extra["mixture.sft.docs"] == data["sft"].num_rows - 1  # all but the over-long example
    assert extra["mixture.web.tokens"] < text_tokens
    st = a.stats
    assert st.rows_in == data["text"].num_rows + data["sft"].num_rows == st.rows_out + st.rows_rejected
    assert st.rejected["not_sampled"] > 0
    # upsampling to a total: the small dataset is repeated, each copy in the same split as the original
    up = pack(
        data,
        tmp_path / "c",
        inputs=inputs,
        seq_len=SFT_SEQ,
        validation_fraction=0.2,
        mixture=[MixtureComponent(name="web", weight=1), MixtureComponent(name="sft", weight=1)],
        total_tokens=2 * text_tokens,
    )
    assert up.manifest["mixture"]["sft"]["rate"] > 2 and up.manifest["mixture"]["web"]["rate"] == 1.0
    assert up.stats.extra["mixture.sft.docs"] > 2 * (data["sft"].num_rows - 1)
    train = {d for r in up.read_table().to_pylist() for d in r["doc_ids"]}
    val = {d for r in up.read_table(table="validation").to_pylist() for d in r["doc_ids"]}
    assert not train & val
    capped = sampling_rates([MixturePart("a", 1, 1000, max_tokens=100), MixturePart("b", 1, 1000)], total_tokens=1000)
    assert capped["a"]["rate"] == pytest.approx(0.1) and capped["b"]["rate"] == pytest.approx(0.5)


def test_bad_inputs_and_configs_are_refused_naming_the_field(data, tmp_path):
    with pytest.raises(StageInputError, match=r"^inputs\[0\]: .*no input_ids column"):
        pack(data, tmp_path, inputs=[data["docs"]])
    with pytest.raises(StageInputError, match="^mixture: 1 components for 2 inputs"):
        pack(data, tmp_path, inputs=[data["text"], data["sft"]], mixture=[MixtureComponent()])
    with pytest.raises(ValidationError, match="seq_len"):
        PackConfig(seq_len=4)
    with pytest.raises(ValidationError, match="mode"):
        PackConfig(mode="greedy")
    with pytest.raises(ValidationError, match="seqlen"):
        PackConfig(seqlen=128)
    with pytest.raises(ValidationError, match="total_tokens"):
        PackConfig(total_tokens=10)


def test_binpack_covers_every_token_once_and_bfd_fills_rows():
    rnd = random.Random(3)
    seq = 512
    lengths = [max(1, int(rnd.lognormvariate(4.5, 1.2))) for _ in range(3000)]  # long-tailed, like web text
    whole = [rnd.random() < 0.1 and n <= seq for n in lengths]
    for pack_fn in (pack_best_fit_decreasing, pack_concat):
        rows = pack_fn(lengths, whole, seq)
        covered = defaultdict(list)
        for row in rows:
            assert 0 < sum(n for _, _, n in row) <= seq
            for item, offset, n in row:
                covered[item].append((offset, n))
        for item, length in enumerate(lengths):
            spans = sorted(covered[item])
            assert spans[0][0] == 0 and sum(n for _, n in spans) == length
            assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
            if whole[item]:
                assert spans == [(0, length)]
        efficiency = sum(lengths) / (len(rows) * seq)
        if pack_fn is pack_best_fit_decreasing:
            assert efficiency > 0.99
            assert all(len(covered[i]) == 1 for i, n in enumerate(lengths) if n <= seq)
    assert pack_best_fit_decreasing([6, 5, 4, 3, 2], [False] * 5, 10) == [
        [(0, 0, 6), (2, 0, 4)],
        [(1, 0, 5), (3, 0, 3), (4, 0, 2)],
    ]
