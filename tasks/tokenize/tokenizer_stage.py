"""The tokenizer stage: a byte-level BPE trained on the corpus, or an existing Hugging Face fast tokenizer.

Either way the output artifact is a directory that `AutoTokenizer.from_pretrained(path)` loads
(tokenizer.json, tokenizer_config.json, chat_template.jinja when there is one); its row table is the
vocabulary (id, token, special), for inspection. Its fingerprint covers the training corpus and settings,
or the loaded files'
content, so a different tokenizer is always a different fingerprint for everything downstream.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field, model_validator

from tasks.artifacts import Artifact, ArtifactWriter
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.tokenize.hf import (
    copy_tokenizer_files,
    load_hub_tokenizer,
    load_tokenizer,
    local_directory,
    tokenizer_identity,
    tokenizer_info,
)

VOCABULARY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int32(), nullable=False),
        pa.field("token", pa.string(), nullable=False),
        pa.field("special", pa.bool_(), nullable=False),
    ]
)
_BYTE_ALPHABET = 256


class TokenizerConfig(StageConfig):
    """Train a byte-level BPE on the documents (the default), or load a tokenizer (`path` / `hub_name`)."""

    execution_fields = StageConfig.execution_fields | {"batch_rows"}

    path: str | None = Field(
        None, description="Load the tokenizer in this local directory (save_pretrained layout) instead of training."
    )
    hub_name: str | None = Field(
        None,
        description="Load this Hugging Face hub tokenizer instead of training (needs internet). Pin `revision` "
        "to a commit so that the cache key changes when the tokenizer does.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for `hub_name`.")
    vocab_size: int = Field(
        8192, ge=260, le=1_000_000, description="Vocabulary size of a trained BPE (special tokens included)."
    )
    min_frequency: int = Field(2, ge=1, description="A pair is merged only if it occurs at least this often.")
    bos_token: str = Field("<|bos|>", min_length=1, description="Beginning-of-document token of a trained BPE.")
    eos_token: str = Field("<|eos|>", min_length=1, description="End-of-document token of a trained BPE.")
    pad_token: str = Field("<|pad|>", min_length=1, description="Padding token of a trained BPE.")
    extra_special_tokens: list[str] = Field(
        [], description="More special tokens for a trained BPE (e.g. chat turn markers used by `chat_template`)."
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template to store with the tokenizer (replaces a loaded tokenizer's own). "
        "Instruction data is formatted with it; without one, with the Alpaca prompt template.",
    )
    max_train_chars: int | None = Field(
        None, ge=1, description="Train on the first documents up to about this many characters (all by default)."
    )
    batch_rows: int = Field(1024, ge=1, description="Documents per Arrow batch while reading the training text.")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if self.path is not None and self.hub_name is not None:
            raise ValueError("path and hub_name: give at most one (a local tokenizer directory, or a hub name)")
        if self.revision is not None and self.hub_name is None:
            raise ValueError("revision: only applies with hub_name")
        specials = self.special_tokens()
        if self.vocab_size < _BYTE_ALPHABET + len(specials):
            raise ValueError(
                f"vocab_size: must be at least {_BYTE_ALPHABET + len(specials)} (256 bytes + special tokens)"
            )
        return self

    def special_tokens(self) -> list[str]:
        return list(dict.fromkeys([self.bos_token, self.eos_token, self.pad_token, *self.extra_special_tokens]))

    @property
    def trains(self) -> bool:
        return self.path is None and self.hub_name is None


def _train_byte_level_bpe(texts: Iterator[str], cfg: TokenizerConfig) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # No prefix space: a document's first word is tokenized as it is written, and offsets stay exact
    # (instruction masking maps tokens to characters through them).
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown token
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=cfg.bos_token, eos_token=cfg.eos_token, pad_token=cfg.pad_token
    )
    if cfg.extra_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(cfg.extra_special_tokens)})
    return tok


class TokenizerStage(Stage):
    """One unit: train or load, save the tokenizer files into the artifact, list the vocabulary.
    Inputs: the documents to train on (several artifacts are read one after the other); none when loading."""

    name = "tokenizer"
    version = 1
    Config = TokenizerConfig

    def sources(self, cfg: TokenizerConfig) -> Any:
        if cfg.path is not None:
            return tokenizer_identity(cfg.path, "path")
        if cfg.hub_name is not None:
            return {"hub_name": cfg.hub_name, "revision": cfg.revision}
        return None

    def fingerprint(self, cfg: TokenizerConfig, input_fingerprints: list[str]) -> str:
        # A loaded tokenizer is its files: the documents beside it in the pipeline do not change it,
        # so a new corpus does not invalidate it (nor, through it, every tokenization downstream).
        return super().fingerprint(cfg, input_fingerprints if cfg.trains else [])

    def plan(self, inputs: list[Artifact], cfg: TokenizerConfig) -> list[dict[str, Any]]:
        if cfg.trains:
            if not inputs:
                raise StageInputError("inputs", "training a tokenizer needs a documents artifact as input")
            for i, art in enumerate(inputs):
                if art.num_rows and "text" not in (art.manifest.get("schema") or []):
                    raise StageInputError(
                        f"inputs[{i}]", f"{art.stage} artifact {art.path} has no 'text' column to train on"
                    )
        return [{"tokenizer": "train" if cfg.trains else ("path" if cfg.path else "hub")}]

    def process(self, unit: dict[str, Any], inputs: list[Artifact], cfg: TokenizerConfig, out: ArtifactWriter) -> None:
        stats = out.stats
        if cfg.trains:
            docs = _TrainingText(inputs, cfg, out)
            tok = _train_byte_level_bpe(iter(docs), cfg)
            if not docs.chars:
                raise StageInputError("inputs", "the documents hold no text to train a tokenizer on")
            stats.extra.update(train_docs=stats.rows_out, train_chars=docs.chars)
        elif cfg.path is not None:
            tok = load_tokenizer(cfg.path, "path")
        else:
            tok = load_hub_tokenizer(cfg.hub_name, cfg.revision)
        if cfg.chat_template is not None:
            tok.chat_template = cfg.chat_template

        with tempfile.TemporaryDirectory(prefix="kiln-tokenizer-") as tmp:
            tok.save_pretrained(tmp)
            _portable_config(tmp, tok)
            copy_tokenizer_files(tmp, out.fs, out.directory)

        specials = set(tok.all_special_ids)
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        for start in range(0, len(vocab), 65_536):
            chunk = vocab[start : start + 65_536]
            out.write(
                pa.RecordBatch.from_pydict(
                    {
                        "id": [i for _, i in chunk],
                        "token": [t for t, _ in chunk],
                        "special": [i in specials for _, i in chunk],
                    },
                    schema=VOCABULARY_SCHEMA,
                ),
                count=False,  # rows out: the documents trained on; the data table is the vocabulary
            )
        stats.extra["vocab_size"] = len(tok)

    def finalize(self, inputs: list[Artifact], cfg: TokenizerConfig, directory: str, fs: Any) -> dict[str, Any]:
        """Load what was written, as a consumer will, and record its special-token ids in the manifest."""
        local = directory if isinstance(fs, LocalFileSystem) else local_directory(fs.unstrip_protocol(directory))
        tok = load_tokenizer(local, "tokenizer")
        info = tokenizer_info(tok)
        info["source"] = "trained" if cfg.trains else ("path" if cfg.path else "hub")
        return {"tokenizer": info}


class _TrainingText:
    """The documents' text, streamed into the BPE trainer; empty or missing text is counted, not trained on."""

    def __init__(self, docs: list[Artifact], cfg: TokenizerConfig, out: ArtifactWriter):
        self.docs = docs
        self.cfg = cfg
        self.out = out
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        stats = self.out.stats
        for batch in self._batches():
            ids = batch.column("id").to_pylist()
            for doc_id, text in zip(ids, batch.column("text").to_pylist()):
                stats.rows_in += 1
                if not isinstance(text, str) or not text.strip():
                    self.out.reject(
                        "empty_text", "no text to train on", id=doc_id, text=text if isinstance(text, str) else None
                    )
                    continue
                stats.rows_out += 1
                self.chars += len(text)
                yield text
                if self.cfg.max_train_chars is not None and self.chars >= self.cfg.max_train_chars:
                    stats.extra["train_chars_limit_reached"] = True
                    return

    def _batches(self) -> Iterator[Any]:
        for art in self.docs:  # documents from several source stages are read one after the other
            if art.num_rows:
                yield from art.iter_batches(columns=["id", "text"], batch_size=self.cfg.batch_rows)


def _portable_config(directory: str, tok: Any) -> None:
    """transformers 5 writes `TokenizersBackend` as the class, which transformers 4 cannot resolve;
    `PreTrainedTokenizerFast` loads the same tokenizer.json in both."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(path) or type(tok).__name__ not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
