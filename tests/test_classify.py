"""Sequence classification: labelled records in (bad labels counted as rejects), a classifier dataset,
and real DeepSpeed training of tiny BERT and Llama classifiers on 2 CPU ranks that stops early on F1 and
exports its best checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tasks.artifacts import ArtifactStore
from tasks.classify import ClassifyIngestConfig, ClassifyIngestStage, ClassifyTokenizeConfig, ClassifyTokenizeStage
from tasks.stage import StageInputError, run_in_store

from conftest import write_jsonl
from train_fixtures import REPO, make_tokenizer

_spec = importlib.util.spec_from_file_location("make_reviews", os.path.join(REPO, "examples", "make_reviews.py"))
make_reviews = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_reviews)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    store = ArtifactStore(str(d / "store"))
    path = write_jsonl(d / "reviews.jsonl", make_reviews.reviews(600, seed=1))
    tok = make_tokenizer(str(d / "tokenizer"), bos=True)  # BERT pools its first token: a [CLS]-like <|bos|>
    docs = run_in_store(ClassifyIngestStage(), ClassifyIngestConfig(paths=[path]), [], store)
    data = run_in_store(
        ClassifyTokenizeStage(), ClassifyTokenizeConfig(max_length=32, validation_fraction=0.2), [docs, tok], store
    )
    return {"store": store, "docs": docs, "data": data, "tok": tok, "dir": d}


def test_bad_labels_are_counted_rejects(tmp_path):
    path = write_jsonl(
        tmp_path / "l.jsonl",
        [
            {"id": "a", "text": "good", "label": "positive"},
            {"id": "b", "text": "bad", "label": 0},  # an index into `labels`
            {"id": "c", "text": "no label"},
            {"id": "d", "text": "unknown", "label": "meh"},
            {"id": "e", "text": "out of range", "label": 7},
            {"id": "f", "text": "a bool", "label": True},
            {"id": "g", "text": "a list", "label": ["positive"]},
            {"id": "h", "text": "  ", "label": "positive"},
            {"id": "a", "text": "same id again", "label": "negative"},
            {"id": "i", "text": "held out", "label": "negative", "split": "dev"},
            {"id": "j", "text": "bad split", "label": "negative", "split": "later"},
        ],
    )
    (tmp_path / "l.csv").write_text("id,text,label\nk,from a csv,positive\nl,csv numeric,1\nm,too,many,fields\n")
    art = run_in_store(
        ClassifyIngestStage(),
        ClassifyIngestConfig(
            paths=[path, str(tmp_path / "l.csv")], labels=["negative", "positive"], split_field="split"
        ),
        [],
        ArtifactStore(str(tmp_path / "s")),
    )
    st = art.stats
    assert st.rejected == {
        "missing_label": 1,
        "unknown_label": 1,
        "label_out_of_range": 1,
        "bad_label": 2,
        "empty_text": 1,
        "duplicate_id": 1,
        "bad_split": 1,
        "bad_csv_row": 1,
    }
    assert st.rows_in == st.rows_out + st.rows_rejected == 14
    rows = {r["id"]: json.loads(r["meta"]) for r in art.read_table().to_pylist()}
    assert sorted(rows) == ["a", "b", "i", "k", "l"]
    assert rows["b"]["label"] == "negative" and rows["l"]["label"] == "positive" and rows["i"]["split"] == "validation"
    assert art.manifest["labels"] == ["negative", "positive"]
    reasons = {r["id"]: r["reason"] for r in art.read_table(table="rejects").to_pylist()}
    assert reasons["a"] == "duplicate_id"  # the second "a": the first one is kept


def test_classifier_dataset_splits_and_label_ids(labelled, tmp_path):
    data = labelled["data"]
    assert data.manifest["labels"] == ["negative", "neutral", "positive"]
    counts = data.manifest["label_counts"]
    assert set(counts["train"]) == set(counts["validation"]) == {"negative", "neutral", "positive"}
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 600
    assert 60 < sum(counts["validation"].values()) < 180
    import datasets

    dd = datasets.load_from_disk(os.path.join(data.path, "hf"))
    assert set(dd) == {"train", "validation"} and set(dd["train"].column_names) == {"input_ids", "label"}
    assert max(len(x) for x in dd["train"]["input_ids"]) <= 32
    # labels the config does not list are rejected; a dataset without labels is refused before work
    narrow = run_in_store(
        ClassifyTokenizeStage(),
        ClassifyTokenizeConfig(labels=["negative", "positive"]),
        [labelled["docs"], labelled["tok"]],
        ArtifactStore(str(tmp_path / "n")),
    )
    assert narrow.stats.rejected == {"unknown_label": 200}
    from tasks.ingest import IngestConfig, IngestStage

    plain_store = ArtifactStore(str(tmp_path / "x"))
    plain = run_in_store(
        IngestStage(), IngestConfig(paths=[write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}])]), [], plain_store
    )
    with pytest.raises(StageInputError, match="records no labels"):
        run_in_store(ClassifyTokenizeStage(), ClassifyTokenizeConfig(), [plain, labelled["tok"]], plain_store)


def _train(labelled, tmp_path, **over):
    from tasks.train.config import TrainConfig
    from tasks.train.stage import TrainStage

    base = dict(
        objective="classification",
        max_steps=240,
        micro_batch_size=16,
        eval_every=10,
        eval_batches=None,
        log_every=10,
        save_every=100,
        seed=0,
        optim={"lr": 4e-3, "warmup_steps": 0, "min_lr_ratio": 1.0},
        early_stopping_patience=4,
        monitor="f1",
    )
    cfg = TrainConfig.model_validate({**base, **over})
    return run_in_store(TrainStage(), cfg, [labelled["data"]], ArtifactStore(str(tmp_path / "store")))


def _predict_accuracy(model_dir: str, labelled) -> tuple[float, list[str]]:
    """Accuracy of the exported model on the validation split, through transformers' own pipeline."""
    from transformers import pipeline

    docs = {r["id"]: r for r in labelled["docs"].read_table().to_pylist()}
    val = labelled["data"].read_table(table="validation").to_pylist()
    clf = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device="cpu")
    preds = [p["label"] for p in clf([docs[r["id"]]["text"] for r in val], truncation=True, max_length=32)]
    names = labelled["data"].manifest["labels"]
    gold = [names[r["label"]] for r in val]
    return sum(p == g for p, g in zip(preds, gold)) / len(gold), preds


@pytest.mark.slow
def test_tiny_bert_classifier_stops_early_on_f1_and_exports_the_best_checkpoint(labelled, tmp_path):
    from transformers import AutoModelForSequenceClassification

    art = _train(
        labelled,
        tmp_path,
        model={
            "init": {
                "model_type": "bert",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "max_position_embeddings": 64,
            },
            "dropout": {"hidden": 0.05, "attention": 0.0, "classifier": 0.1},
        },
        label_smoothing=0.05,
    )
    metrics = json.load(open(os.path.join(art.path, "metrics.json")))
    val = [h for h in metrics["history"] if h["kind"] == "validation"]
    assert metrics["stopped"] and metrics["stopped"].startswith("early stopping: no better validation f1")
    assert metrics["steps"] < 240 and metrics["best_step"] == metrics["exported_step"] < metrics["steps"]
    best = max(val, key=lambda h: h["f1"])
    assert best["step"] == metrics["best_step"] and best["accuracy"] >= 0.9  # chance: 0.33
    assert {"precision/positive", "recall/negative", "f1/neutral", "confusion"} <= set(best)
    model = AutoModelForSequenceClassification.from_pretrained(art.path)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    accuracy, _ = _predict_accuracy(art.path, labelled)
    assert abs(accuracy - best["accuracy"]) < 1e-9  # the exported weights are the best validation's
    assert (
        art.stats.extra["final_f1"] is not None
        and "Confusion matrix" in open(os.path.join(art.path, "report.md")).read()
    )


@pytest.mark.slow
def test_tiny_llama_classifier_with_lora(labelled, tmp_path):
    art = _train(
        labelled,
        tmp_path,
        model={
            "init": {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
            }
        },
        method={"method": "lora", "lora_r": 8, "target_modules": "all-linear"},
        early_stopping_patience=None,
        max_steps=80,
        deepspeed={"zero_stage": 3},
    )
    metrics = json.load(open(os.path.join(art.path, "metrics.json")))
    best = max((h for h in metrics["history"] if h["kind"] == "validation"), key=lambda h: h["f1"])
    assert best["accuracy"] >= 0.8 and best["f1"] >= 0.8
    assert os.path.isdir(os.path.join(art.path, "adapter"))
    accuracy, _ = _predict_accuracy(art.path, labelled)  # the merged model
    assert abs(accuracy - best["accuracy"]) < 1e-9


def test_label_sets_that_differ_between_splits_are_refused_before_training(labelled, tmp_path):
    from tasks.train.config import TrainConfig
    from tasks.train.stage import TrainStage

    path = write_jsonl(
        tmp_path / "l.jsonl",
        [{"id": f"t{i}", "text": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
        + [{"id": "v", "text": "v", "label": "c", "split": "test"}],
    )
    store = ArtifactStore(str(tmp_path / "s"))
    docs = run_in_store(ClassifyIngestStage(), ClassifyIngestConfig(paths=[path], split_field="split"), [], store)
    data = run_in_store(
        ClassifyTokenizeStage(), ClassifyTokenizeConfig(validation_fraction=0), [docs, labelled["tok"]], store
    )
    cfg = TrainConfig(objective="classification", model={"init": {"model_type": "bert"}})
    with pytest.raises(
        StageInputError, match=r"different label sets: only in train \['a', 'b'\], only in validation \['c'\]"
    ):
        TrainStage().plan([data], cfg)
    with pytest.raises(StageInputError, match="^monitor"):
        TrainStage().plan([labelled["data"]], cfg.model_copy(update={"monitor": "bleu"}))
    with pytest.raises(StageInputError, match="^model.dropout.hidden: the llama config has no hidden dropout"):
        TrainStage().plan(
            [labelled["data"]],
            TrainConfig(
                objective="classification", model={"init": {"model_type": "llama"}, "dropout": {"hidden": 0.1}}
            ),
        )
