"""The `clean` stage: normalise, then keep or drop each document by small, switchable filters.

Order (the one datatrove's FineWeb recipe uses): normalise -> length -> Gopher repetition -> Gopher
quality -> C4 (line rules edit the text) -> FineWeb -> in-document repeat removal. Code documents
(meta says so) get the length and code rules instead of the prose rules, which would wreck them.
Every dropped document is a reject with "<filter>:<rule>"; every edit is counted in stats.extra.
Optionally last, decontamination: a document that shares a 13-gram with an item of a configured evaluation
task is dropped as `decontaminate:<task>` (tasks/eval/contamination.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tasks.artifacts import Artifact, ArtifactWriter, read_unit
from tasks.clean.filters import (
    C4Config,
    C4Filter,
    CodeConfig,
    CodeFilter,
    Doc,
    FineWebConfig,
    FineWebFilter,
    GopherQualityConfig,
    GopherQualityFilter,
    GopherRepetitionFilter,
    InDocDedup,
    InDocDedupConfig,
    LengthConfig,
    LengthFilter,
    NormaliseConfig,
    Normaliser,
    RepetitionConfig,
)
from tasks.documents import DOCUMENT_SCHEMA, DocumentBatcher, parse_meta
from tasks.stage import Stage, StageConfig, StageInputError


class CodeDetection(BaseModel):
    model_config = {"extra": "forbid"}
    meta_keys: list[str] = Field(
        ["language"],
        description="A document whose meta has one of these keys is code "
        "(the crawl stage puts 'language' there for source files).",
    )
    sources: list[str] = Field([], description="Substrings of `source` that mark code documents.")


class DecontaminateConfig(BaseModel):
    model_config = {"extra": "forbid"}
    tasks: list[str] = Field(
        ...,
        min_length=1,
        description="Evaluation tasks whose items must not be trained on: lm_eval task names or local task "
        "YAMLs, as in an eval section.",
    )
    ngram: int = Field(13, ge=3, le=64, description="Words per n-gram (13, as the GPT-3 and Llama reports).")


class CleanConfig(StageConfig):
    """Which filters run, with which thresholds. Each section has `enabled`."""

    execution_fields = StageConfig.execution_fields | {"batch_rows"}

    normalise: NormaliseConfig = Field(default_factory=NormaliseConfig)
    length: LengthConfig = Field(default_factory=LengthConfig)
    repetition: RepetitionConfig = Field(default_factory=RepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    in_doc_dedup: InDocDedupConfig = Field(default_factory=InDocDedupConfig)
    code: CodeConfig = Field(default_factory=CodeConfig)
    code_detection: CodeDetection = Field(default_factory=CodeDetection)
    batch_rows: int = Field(2048, ge=1, description="Rows per Arrow batch written.")
    decontaminate: DecontaminateConfig | None = Field(
        None, description="Drop documents that share an n-gram with an evaluation item (`decontaminate:<task>`)."
    )

    def fingerprint_config(self) -> dict[str, Any]:
        out = super().fingerprint_config()
        if out.get("decontaminate") is None:
            out.pop("decontaminate", None)  # a config without it keeps the fingerprint it had before
        return out


def _is_code(meta: dict[str, Any], source: str | None, det: CodeDetection) -> bool:
    if any(k in meta for k in det.meta_keys) or meta.get("kind") == "code":
        return True
    return bool(source) and any(s in source for s in det.sources)


class DocumentCleaner:
    """The filter chain for one config; `clean(text, is_code)` -> (text, None) or (text, (reason, detail))."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.normaliser = Normaliser(cfg.normalise) if cfg.normalise.enabled else None
        self.length = LengthFilter(cfg.length) if cfg.length.enabled else None
        self.prose = [
            f
            for f, on in (
                (GopherRepetitionFilter(cfg.repetition), cfg.repetition.enabled),
                (GopherQualityFilter(cfg.gopher_quality), cfg.gopher_quality.enabled),
                (C4Filter(cfg.c4), cfg.c4.enabled),
                (FineWebFilter(cfg.fineweb), cfg.fineweb.enabled),
            )
            if on
        ]
        self.code = CodeFilter(cfg.code) if cfg.code.enabled else None
        self.dedup = InDocDedup(cfg.in_doc_dedup) if cfg.in_doc_dedup.enabled else None

    def clean(self, text: str, is_code: bool, counts: dict[str, int]) -> tuple[str, tuple[str, str] | None]:
        if self.normaliser is not None:
            new = self.normaliser.edit(text, is_code)
            if new != text:
                counts["normalised_docs"] = counts.get("normalised_docs", 0) + 1
            text = new
        if not text.strip():
            return text, ("normalise:empty", "no text left after normalisation")
        doc = Doc(text)
        if self.length is not None and (v := self.length.check(doc)):
            return doc.text, v
        if is_code:
            if self.code is not None and (v := self.code.check(doc)):
                return doc.text, v
            return doc.text, None
        for f in self.prose:
            if isinstance(f, C4Filter):
                v, removed = f.check_and_edit(doc)
                if removed:
                    counts["c4_lines_removed"] = counts.get("c4_lines_removed", 0) + removed
            else:
                v = f.check(doc)
            if v:
                return doc.text, v
        if self.dedup is not None:
            new, removed = self.dedup.edit(doc.text)
            if removed:
                counts["repeats_removed_in_doc"] = counts.get("repeats_removed_in_doc", 0) + removed
                counts["docs_with_repeats_removed"] = counts.get("docs_with_repeats_removed", 0) + 1
            return new, None
        return doc.text, None


class CleanStage(Stage):
    name = "clean"
    version = 1
    Config = CleanConfig
    balanced = True
    splittable = True
    reuses_shards = True  # an unchanged shard's unit is copied from an earlier artifact

    def sources(self, cfg: CleanConfig) -> Any:
        if cfg.decontaminate is None:
            return None
        import os

        from tasks.eval.harness import harness_version, is_task_file, task_identity

        for spec in cfg.decontaminate.tasks:
            if is_task_file(spec) and not os.path.isfile(spec):
                raise StageInputError("decontaminate.tasks", f"no such task file: {spec}")
        return {
            "decontaminate": {
                "lm_eval": harness_version(),
                "tasks": [task_identity(t) for t in cfg.decontaminate.tasks],
            }
        }

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: CleanConfig, out: ArtifactWriter) -> None:
        cleaner = DocumentCleaner(cfg)
        index = None
        if cfg.decontaminate is not None:
            from tasks.eval.contamination import index_for

            index, failed = index_for(cfg.decontaminate.tasks, cfg.decontaminate.ngram)
            if failed:  # decontaminating against fewer tasks than asked would pass contaminated documents
                raise StageInputError("decontaminate.tasks", "; ".join(f"{t}: {why}" for t, why in failed.items()))
        counts: dict[str, int] = {}
        docs = DocumentBatcher(DOCUMENT_SCHEMA, cfg.batch_rows)
        for batch in read_unit(inputs[unit["input"]], unit, batch_rows=256, stats=out.stats):
            for row in batch.to_pylist():
                text = row.get("text")
                if not isinstance(text, str):
                    out.reject("clean:no_text", "text is missing", **{**row, "text": ""})
                    continue
                is_code = _is_code(parse_meta(row.get("meta")), row.get("source"), cfg.code_detection)
                new, verdict = cleaner.clean(text, is_code, counts)
                if verdict:
                    out.reject(*verdict, **{**row, "text": text})
                    continue
                if index is not None and (hit := index.first_match(new)) is not None:
                    detail = f"shares the {index.n}-gram '{hit.ngram}' with item {hit.item} of {hit.task}"
                    out.reject(f"decontaminate:{hit.task}", detail, **{**row, "text": text})
                    continue
                out.write(docs.add(**{**row, "text": new}))
        out.write(docs.flush())
        for key, n in counts.items():
            out.count(key, n)
