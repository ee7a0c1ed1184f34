"""The tokenize stage: documents -> token ids.

Inputs: documents artifacts (one or several, read together) and then, unless the config names a
tokenizer directory (`tokenizer: DIR`), the tokenizer artifact. One unit per documents shard. Text is
tokenized in batches straight from the Parquet record batches with the Rust tokenizer's batch call
(which spreads a batch over all cores), EOS appended to every document and BOS optionally prepended.
Instruction data (`format: sft`) is rendered with the tokenizer's chat template or the Alpaca prompt,
and its prompt tokens are masked out of `labels` (-100).

Output rows: id, input_ids (list<int32>), n_tokens, and labels for instruction data. Documents that
give nothing to train on are rejected with a reason.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from tasks.artifacts import Artifact, ArtifactWriter, read_unit
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.tokenize.hf import (
    load_tokenizer,
    local_directory,
    tokenizer_identity,
    tokenizer_info,
)
from tasks.tokenize.sft import (
    SftRecordError,
    normalize_sft_record,
    render_alpaca,
    render_chat_template,
)

_ENCODE_AHEAD = 2  # batches being encoded at once per unit
IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and Hugging Face models) skip

TOKENS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
    ]
)
SFT_TOKENS_SCHEMA = TOKENS_SCHEMA.append(pa.field("labels", pa.list_(pa.int32()), nullable=False))


class TokenizeConfig(StageConfig):
    """How documents become token ids."""

    execution_fields = StageConfig.execution_fields | {"batch_rows"}

    tokenizer: str | None = Field(
        None,
        description="A local tokenizer directory (save_pretrained layout), used when no tokenizer artifact is "
        "given as the second input. Its files' content is part of the fingerprint.",
    )
    format: Literal["text", "sft"] = Field(
        "text",
        description="'text': the documents' text (pretraining). 'sft': instruction examples from the documents' "
        "meta (written by the sft_ingest stage, or Alpaca / chat fields kept in meta by ingest).",
    )
    add_bos: bool = Field(False, description="Prepend the tokenizer's BOS token to every document.")
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token to every document.")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto",
        description="sft only: 'chat' the tokenizer's chat template, 'alpaca' the Alpaca prompt, "
        "'auto' the chat template when the tokenizer has one.",
    )
    split_special_tokens: bool = Field(
        True,
        description="text only: a special token written in a document (say '<|eos|>' in a page about "
        "tokenizers) is tokenized as plain text, so no document can forge a boundary.",
    )
    batch_rows: int = Field(1024, ge=1, description="Documents per tokenizer batch call.")


# --------------------------------------------------------------------------------------------------
# the tokenizer a unit uses


def is_tokenizer_artifact(art: Artifact) -> bool:
    return art.stage == "tokenizer"


def split_inputs(inputs: list[Artifact], cfg: TokenizeConfig) -> tuple[list[Artifact], Artifact | None]:
    """(documents artifacts, tokenizer artifact or None). Documents may come from several stages (the
    pipeline's source stages, read together); a tokenizer artifact, when given, is the last input."""
    tokenizer = inputs[-1] if inputs and is_tokenizer_artifact(inputs[-1]) else None
    docs = inputs[:-1] if tokenizer is not None else list(inputs)
    if not docs:
        raise StageInputError("inputs", "tokenize needs a documents artifact as its first input")
    for i, art in enumerate(docs):
        if is_tokenizer_artifact(art):
            raise StageInputError(f"inputs[{i}]", f"{art.path} is a tokenizer; a tokenizer artifact goes last")
    if tokenizer is not None and cfg.tokenizer is not None:
        raise StageInputError("tokenizer", "a tokenizer artifact is an input already; set `tokenizer` only without one")
    return docs, tokenizer


def tokenizer_directory(inputs: list[Artifact], cfg: TokenizeConfig) -> tuple[str, str]:
    """(local directory, config field to name in errors) of the tokenizer to use."""
    docs, tokenizer = split_inputs(inputs, cfg)
    if tokenizer is not None:
        return local_directory(tokenizer.path), f"inputs[{len(docs)}]"
    if cfg.tokenizer is None:
        raise StageInputError(
            "tokenizer", "no tokenizer: give a tokenizer artifact as the last input, or a directory in `tokenizer`"
        )
    return cfg.tokenizer, "tokenizer"


_BACKENDS: dict[tuple[int, bool], Any] = {}
_BACKENDS_LOCK = threading.Lock()


def _backend(tok: Any, split_special_tokens: bool) -> Any:
    """The Rust tokenizer, copied when special tokens must read as text: the setting lives on the object,
    and the loaded tokenizer is shared by every unit in the process."""
    if not split_special_tokens:
        return tok.backend_tokenizer
    from tokenizers import Tokenizer

    key = (id(tok), split_special_tokens)
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            copy = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            copy.encode_special_tokens = True
            _BACKENDS[key] = copy
        return _BACKENDS[key]


# --------------------------------------------------------------------------------------------------
# assembling token rows


def _with_specials(
    flat: np.ndarray, lengths: np.ndarray, bos: int | None, eos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Insert BOS / EOS around every document of a flat token array without a Python loop per token."""
    extra = (bos is not None) + (eos is not None)
    out_lengths = lengths + extra
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(out_lengths, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    content = np.ones(len(out), dtype=bool)
    if bos is not None:
        out[offsets[:-1]] = bos
        content[offsets[:-1]] = False
    if eos is not None:
        out[offsets[1:] - 1] = eos
        content[offsets[1:] - 1] = False
    out[content] = flat
    return out, offsets


def _encode_flat(backend: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' token ids in one int32 array, and each document's length."""
    token_lists = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _list_array(flat: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=pa.int32()))


# --------------------------------------------------------------------------------------------------
# the stage


class TokenizeStage(Stage):
    name = "tokenize"
    version = 1
    Config = TokenizeConfig
    balanced = True
    splittable = True
    reuses_shards = True  # an unchanged shard's unit is copied from an earlier artifact

    def bindings(self, cfg: TokenizeConfig) -> dict[str, str | None]:
        # `tokenizer: DIR` in the config: no tokenizer stage is read
        return {"tokenizer": None} if cfg.tokenizer is not None else {}

    def sources(self, cfg: TokenizeConfig) -> Any:
        # A tokenizer artifact input is fingerprinted as an input; a directory by its files' content.
        return {"tokenizer": tokenizer_identity(cfg.tokenizer, "tokenizer")} if cfg.tokenizer is not None else None

    def plan(self, inputs: list[Artifact], cfg: TokenizeConfig) -> list[dict[str, Any]]:
        docs, _ = split_inputs(inputs, cfg)
        needed = {"id", "meta"} if cfg.format == "sft" else {"id", "text"}
        for i, art in enumerate(docs):
            schema = set(art.manifest.get("schema") or [])
            if art.num_rows and not needed <= schema:
                raise StageInputError(
                    f"inputs[{i}]", f"{art.stage} artifact {art.path} lacks column(s) {sorted(needed - schema)}"
                )
        path, field = tokenizer_directory(inputs, cfg)
        tok = load_tokenizer(path, field)
        self._check_tokenizer(tok, cfg)
        return [{"input": i, "shard": j} for i, art in enumerate(docs) for j in range(len(art.shards()))]

    @staticmethod
    def _check_tokenizer(tok: Any, cfg: TokenizeConfig) -> None:
        if cfg.add_eos and tok.eos_token_id is None:
            raise StageInputError(
                "add_eos", "the tokenizer has no EOS token; set add_eos: false or use another tokenizer"
            )
        if cfg.add_bos and tok.bos_token_id is None:
            raise StageInputError("add_bos", "the tokenizer has no BOS token")
        if cfg.format == "sft":
            if cfg.template == "chat" and not getattr(tok, "chat_template", None):
                raise StageInputError("template", "the tokenizer has no chat template (set one on the tokenizer stage)")
            if _uses_alpaca(tok, cfg) and tok.eos_token is None:
                raise StageInputError("template", "the Alpaca format ends replies with EOS, and the tokenizer has none")

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: TokenizeConfig, out: ArtifactWriter) -> None:
        path, field = tokenizer_directory(inputs, cfg)
        tok = load_tokenizer(path, field)
        self._check_tokenizer(tok, cfg)
        docs = inputs[unit["input"]]
        columns = ["id", "meta"] if cfg.format == "sft" else ["id", "text"]
        if cfg.format == "text" and "source" in (docs.manifest.get("schema") or []):
            columns.append("source")  # kept on rejects when the documents have it
        batches = read_unit(docs, unit, columns, batch_rows=cfg.batch_rows, stats=out.stats)
        if cfg.format == "sft":
            for batch in batches:
                out.write(self._sft_batch(batch, tok, cfg, out))
        else:
            self._text_batches(batches, tok, cfg, out)

    # ----------------------------------------------------------------------------------------------

    def _text_batches(self, batches: Any, tok: Any, cfg: TokenizeConfig, out: ArtifactWriter) -> None:
        """Two batches are encoded at a time while the one before is written: the Rust tokenizer releases
        the GIL, so Arrow conversion and Parquet writing hide behind it, and one batch's long document
        no longer leaves a core idle at the batch's end."""
        backend = _backend(tok, cfg.split_special_tokens)
        in_flight: collections.deque = collections.deque()
        with ThreadPoolExecutor(max_workers=_ENCODE_AHEAD, thread_name_prefix="kiln-tokenize") as pool:
            for batch in batches:
                ids, texts = self._valid_texts(batch, out)
                if texts:
                    in_flight.append((ids, texts, pool.submit(_encode_flat, backend, texts)))
                if len(in_flight) >= _ENCODE_AHEAD:
                    out.write(self._text_rows(*in_flight.popleft(), tok, cfg, out))
            while in_flight:
                out.write(self._text_rows(*in_flight.popleft(), tok, cfg, out))

    @staticmethod
    def _valid_texts(batch: pa.RecordBatch, out: ArtifactWriter) -> tuple[list[str], list[str]]:
        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        names = batch.schema.names
        sources = batch.column("source").to_pylist() if "source" in names else [None] * len(ids)
        keep_ids, keep_texts = [], []
        for doc_id, text, source in zip(ids, texts, sources):
            if doc_id is None:
                out.reject("missing_id", "document has no id", text=text, source=source)
            elif not isinstance(text, str):
                out.reject("missing_text", "document has no text", id=doc_id, source=source)
            elif not text.strip():
                out.reject("empty_text", "text is empty or whitespace", id=doc_id, text=text, source=source)
            else:
                keep_ids.append(doc_id)
                keep_texts.append(text)
        return keep_ids, keep_texts

    def _text_rows(
        self,
        ids: list[str],
        texts: list[str],
        encoded: Future,
        tok: Any,
        cfg: TokenizeConfig,
        out: ArtifactWriter,
    ) -> pa.RecordBatch | None:
        flat, lengths = encoded.result()
        if not lengths.all():  # text that the tokenizer's normalizer erases entirely
            for i in np.flatnonzero(lengths == 0):
                out.reject("no_tokens", "the tokenizer produced no tokens", id=ids[i], text=texts[i])
            nonzero = np.flatnonzero(lengths)
            ids = [ids[i] for i in nonzero]
            texts = [texts[i] for i in nonzero]
            lengths = lengths[nonzero]
            if not len(lengths):
                return None
        tokens, offsets = _with_specials(
            flat, lengths, tok.bos_token_id if cfg.add_bos else None, tok.eos_token_id if cfg.add_eos else None
        )
        n_tokens = np.diff(offsets).astype(np.int32)
        out.count("tokens", int(len(tokens)))
        out.count("chars", sum(map(len, texts)))
        return pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.string()), _list_array(tokens, offsets), pa.array(n_tokens)], schema=TOKENS_SCHEMA
        )

    def _sft_batch(
        self, batch: pa.RecordBatch, tok: Any, cfg: TokenizeConfig, out: ArtifactWriter
    ) -> pa.RecordBatch | None:
        ids = batch.column("id").to_pylist()
        metas = batch.column("meta").to_pylist()
        alpaca = _uses_alpaca(tok, cfg)
        keep_ids, texts, spans = [], [], []
        for doc_id, meta in zip(ids, metas):
            if doc_id is None:
                out.reject("missing_id", "document has no id", meta=meta)
                continue
            try:
                record = json.loads(meta) if isinstance(meta, str) else None
                if not isinstance(record, dict):
                    raise SftRecordError("missing_sft_fields", "meta is not a JSON object")
                example = normalize_sft_record(record.get("sft", record))
                text, turn_spans = (
                    render_alpaca(example, tok.eos_token) if alpaca else render_chat_template(example, tok)
                )
            except json.JSONDecodeError as e:
                out.reject("invalid_meta", f"meta is not JSON: {e}", id=doc_id, meta=meta)
                continue
            except SftRecordError as e:
                out.reject(e.reason, e.detail, id=doc_id, meta=meta)
                continue
            keep_ids.append(doc_id)
            texts.append(text)
            spans.append(turn_spans)
        if not texts:
            return None
        # Offsets (character spans of every token) are what tell prompt tokens from reply tokens.
        encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        bos = tok.bos_token_id if cfg.add_bos else None
        eos = tok.eos_token_id if cfg.add_eos else None
        out_ids, out_tokens, out_labels = [], [], []
        for doc_id, text, turn_spans, enc in zip(keep_ids, texts, spans, encodings):
            tokens = np.asarray(enc.ids, dtype=np.int32)
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            trained = np.zeros(len(tokens), dtype=bool)
            for start, end in turn_spans:
                trained |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
            if bos is not None and (not len(tokens) or tokens[0] != bos):
                tokens = np.concatenate([[bos], tokens]).astype(np.int32)
                trained = np.concatenate([[False], trained])
            if eos is not None and (not len(tokens) or tokens[-1] != eos):
                # The closing EOS is learned only when the conversation ends on a reply.
                ends_on_reply = bool(turn_spans) and turn_spans[-1][1] >= len(text.rstrip())
                tokens = np.concatenate([tokens, [eos]]).astype(np.int32)
                trained = np.concatenate([trained, [ends_on_reply]])
            if not trained.any():
                out.reject("no_target_tokens", "no reply token survives tokenization", id=doc_id, text=text)
                continue
            out_ids.append(doc_id)
            out_tokens.append(tokens)
            out_labels.append(np.where(trained, tokens, IGNORE_INDEX).astype(np.int32))
            out.count("target_tokens", int(trained.sum()))
        if not out_ids:
            return None
        lengths = np.fromiter(map(len, out_tokens), dtype=np.int64, count=len(out_tokens))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out.count("tokens", int(offsets[-1]))
        return pa.RecordBatch.from_arrays(
            [
                pa.array(out_ids, pa.string()),
                _list_array(np.concatenate(out_tokens), offsets),
                pa.array(lengths.astype(np.int32)),
                _list_array(np.concatenate(out_labels), offsets),
            ],
            schema=SFT_TOKENS_SCHEMA,
        )

    # ----------------------------------------------------------------------------------------------

    def finalize(self, inputs: list[Artifact], cfg: TokenizeConfig, directory: str, fs: Any) -> dict[str, Any]:
        """Token counts over the whole artifact and the tokenizer's identity, for pack and for readers."""
        path, field = tokenizer_directory(inputs, cfg)
        tok = load_tokenizer(path, field)
        tokenizer = tokenizer_info(tok)
        _, artifact = split_inputs(inputs, cfg)
        if artifact is not None:
            tokenizer.update(path=artifact.path, fingerprint=artifact.fingerprint)
        else:
            identity = tokenizer_identity(cfg.tokenizer, "tokenizer")
            tokenizer.update(path=identity["path"], fingerprint=identity["sha256"][:20])
        return {"tokenizer": tokenizer, "tokens": token_length_summary(fs, directory)}


def _uses_alpaca(tok: Any, cfg: TokenizeConfig) -> bool:
    return cfg.template == "alpaca" or (cfg.template == "auto" and not getattr(tok, "chat_template", None))


def token_length_summary(fs: Any, directory: str) -> dict[str, Any]:
    """Exact totals and a power-of-two histogram of document lengths; memory is one column batch."""
    base = directory.rstrip("/")
    shards = sorted(fs.glob(f"{base}/part-*.parquet"))
    docs = tokens = 0
    smallest, largest = None, 0
    buckets = np.zeros(40, dtype=np.int64)
    for shard in shards:
        with fs.open(shard, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["n_tokens"], batch_size=65_536):
                n = batch.column(0).to_numpy().astype(np.int64)
                if not len(n):
                    continue
                docs += len(n)
                tokens += int(n.sum())
                smallest = int(n.min()) if smallest is None else min(smallest, int(n.min()))
                largest = max(largest, int(n.max()))
                buckets += np.bincount(np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64), minlength=40)[:40]
    histogram = {f"<={1 << i}": int(c) for i, c in enumerate(buckets) if c}
    return {
        "docs": docs,
        "tokens": tokens,
        "min": smallest or 0,
        "max": largest,
        "mean": round(tokens / docs, 2) if docs else 0.0,
        "length_histogram": histogram,
    }


class SftTokenizeConfig(TokenizeConfig):
    format: Literal["text", "sft"] = Field("sft", description="Instruction examples (see TokenizeConfig).")


class SftTokenizeStage(TokenizeStage):
    """The tokenize stage under its own name, for a pipeline that tokenizes pretraining text and
    instruction data side by side (two artifacts, mixed by pack)."""

    name = "sft_tokenize"
    Config = SftTokenizeConfig
