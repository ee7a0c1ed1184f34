"""The langid stage: fastText lid.176 (bundled, offline) labels every document; filters by language."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tasks.artifacts import ArtifactStore
from tasks.ingest import IngestConfig, IngestStage
from tasks.langid import LangIdConfig, LangIdStage, LanguageIdentifier, model_input
from tasks.stage import StageInputError, run_in_store

from conftest import write_jsonl

SAMPLES = {
    "en": "The committee met on Tuesday to review the budget for the coming year and agreed on new hours.",
    "de": "Der Ausschuss trat am Dienstag zusammen, um den Haushalt für das kommende Jahr zu prüfen.",
    "fr": "Le comité s'est réuni mardi pour examiner le budget de l'année à venir et les horaires.",
    "es": "El comité se reunió el martes para revisar el presupuesto del próximo año y los horarios.",
    "ru": "Комитет собрался во вторник, чтобы рассмотреть бюджет на следующий год и часы работы.",
    "ja": "委員会は火曜日に集まり、来年度の予算と図書館の開館時間について検討しました。",
}


def _docs(tmp_path, records):
    p = write_jsonl(tmp_path / "in" / "docs.jsonl", records)
    store = ArtifactStore(str(tmp_path / "store"))
    return store, run_in_store(IngestStage(), IngestConfig(paths=[p]), [], store)


def test_identifies_languages():
    ident = LanguageIdentifier(LangIdConfig())
    got = [lang for lang, _ in ident.predict(list(SAMPLES.values()))]
    assert got == list(SAMPLES)


def test_model_input_is_bounded_and_normalised():
    text = "VISIT https://example.com/x?y=1 OR mail me@example.org 2024-01-01 !!! " + "word " * 100_000
    prepared = model_input(text, 200, 3)
    assert len(prepared) <= 3 * 200 + 2 and "http" not in prepared and "2024" not in prepared
    assert prepared == prepared.lower()
    assert model_input("12:30 — 45%", 200, 3) == ""


def test_stage_labels_every_document_and_filters(tmp_path):
    records = [{"id": lang, "text": t} for lang, t in SAMPLES.items()]
    records += [
        {"id": "empty", "text": "   "[:0] + "1234 5678 !!!"},
        {"id": "ctrl", "text": "\x00\x01 " + SAMPLES["en"]},
        {"id": "huge", "text": SAMPLES["de"] * 600_000},  # ~55 MB
        {"id": "code", "text": "def f(x):\n    return x + 1\n", "language": "python"},
        {"id": "shout", "text": SAMPLES["en"].upper()},
    ]
    store, docs = _docs(tmp_path, records)
    art = run_in_store(LangIdStage(), LangIdConfig(languages=["en", "de"], min_score=0.5), [docs], store)
    st = art.stats
    assert st.rows_in == 11 == st.rows_out + st.rows_rejected
    kept = {d["id"]: d for d in art.read_table().to_pylist()}
    assert set(kept) == {"en", "de", "ctrl", "huge", "code", "shout"}
    assert kept["huge"]["lang"] == "de" and kept["shout"]["lang"] == "en"
    rej = {r["id"]: r for r in art.read_table(table="rejects").to_pylist()}
    assert {k: r["reason"] for k, r in rej.items()} == {
        "fr": "langid:language_not_kept",
        "es": "langid:language_not_kept",
        "ru": "langid:language_not_kept",
        "ja": "langid:language_not_kept",
        "empty": "langid:no_text",
    }
    assert rej["ru"]["lang"] == "ru"
    for row in [*kept.values(), *rej.values()]:  # lang and lang_score on every document, kept or not
        assert "lang_score" in json.loads(row["meta"])
    assert json.loads(kept["en"]["meta"])["lang_score"] > 0.8


def test_confidence_threshold_and_label_only(tmp_path):
    store, docs = _docs(tmp_path, [{"id": "en", "text": SAMPLES["en"]}, {"id": "mix", "text": "ok sí ja oui da"}])
    art = run_in_store(LangIdStage(), LangIdConfig(min_score=0.7), [docs], store)
    assert art.read_table().column("id").to_pylist() == ["en"]
    assert art.stats.rejected == {"langid:low_score": 1}


def test_custom_model_path_and_bad_config(tmp_path):
    from tasks.langid.stage import bundled_model_path

    store, docs = _docs(tmp_path, [{"id": "fr", "text": SAMPLES["fr"]}])
    art = run_in_store(LangIdStage(), LangIdConfig(model_path=bundled_model_path()), [docs], store)
    assert art.read_table().column("lang").to_pylist() == ["fr"]
    with pytest.raises(StageInputError, match="model_path"):
        run_in_store(LangIdStage(), LangIdConfig(model_path=str(tmp_path / "nope.bin")), [docs], store)
    not_a_model = tmp_path / "junk.bin"
    not_a_model.write_bytes(b"not a fasttext model")
    with pytest.raises(StageInputError, match="model_path"):
        run_in_store(LangIdStage(), LangIdConfig(model_path=str(not_a_model)), [docs], store)
    with pytest.raises(ValidationError, match="languages"):
        LangIdConfig(languages=["English!"])
    with pytest.raises(ValidationError, match="min_score"):
        LangIdConfig(min_score=2)
