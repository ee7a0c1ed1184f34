"""pref_tokenize: preference pairs -> token ids for preference training (SimPO, DPO, a reward model).

Inputs: pairs (the `pairs` or `pref_ingest` stage's output) and a tokenizer: any artifact holding
tokenizer files (a tokenizer stage's, or the policy's training run: its export carries the tokenizer),
or a directory in `tokenizer`.

A side is the prompt rendered as generation renders it (chat template with its generation prompt, or the
Alpaca prompt) followed by the reply and EOS. The prompt and the reply are tokenized apart and joined,
so the reply's tokens are those the model would have produced after the prompt. The labels mask the
prompt (-100): the reply and its EOS are the targets; a sequence starts with exactly one BOS when the
tokenizer has one. A pair longer than `max_length` is cut by rule (`too_long: truncate`: the start of
the prompt first, down to `min_prompt_tokens`, then the ends of the replies) or rejected
(`too_long: reject`, reason `too_long`). Pairs go to validation by a hash of their id.

Output rows: id, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels; a Hugging Face
DatasetDict under hf/ and the tokenizer under tokenizer/.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from tasks.artifacts import Artifact, ArtifactWriter, pick, read_unit
from tasks.pack.hf_dataset import save_dataset_dict
from tasks.pack.mixture import in_validation
from tasks.prefs.schema import load_messages
from tasks.stage import Stage, StageConfig, StageInputError
from tasks.tokenize.hf import copy_tokenizer_files, load_tokenizer, local_directory, tokenizer_identity, tokenizer_info
from tasks.tokenize.sft import SftRecordError, render_prompt
from tasks.tokenize.stage import IGNORE_INDEX

_IDS = pa.list_(pa.int32())
PREF_TOKENS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("chosen_input_ids", _IDS, nullable=False),
        pa.field("chosen_labels", _IDS, nullable=False),
        pa.field("rejected_input_ids", _IDS, nullable=False),
        pa.field("rejected_labels", _IDS, nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
    ]
)
HF_SCHEMA = pa.schema([f for f in PREF_TOKENS_SCHEMA if f.name not in ("id", "n_tokens")])


class PrefTokenizeConfig(StageConfig):
    """How pairs become token ids."""

    execution_fields = StageConfig.execution_fields | {"batch_rows"}

    tokenizer: str | None = Field(
        None, description="A local tokenizer directory, when no tokenizer artifact is an input."
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="How the prompt is rendered: the chat template, the Alpaca prompt, or auto."
    )
    max_length: int = Field(1024, ge=8, description="Longest sequence (prompt + reply + EOS).")
    too_long: Literal["truncate", "reject"] = Field("truncate", description="What happens to a longer pair.")
    min_prompt_tokens: int = Field(
        8, ge=1, description="truncate: the prompt keeps at least its last this-many tokens."
    )
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="Share of pairs held out for validation.")
    split_seed: int = Field(0, description="Seed of the pair-level train/validation split.")
    batch_rows: int = Field(512, ge=1)


def _join(prompt: list[int], reply: list[int]) -> tuple[list[int], list[int]]:
    return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply


class PrefTokenizeStage(Stage):
    name = "pref_tokenize"
    version = 1
    Config = PrefTokenizeConfig
    balanced = True
    splittable = True

    def bindings(self, cfg: PrefTokenizeConfig) -> dict[str, str | None]:
        return {"tokenizer": None} if cfg.tokenizer else {}

    def sources(self, cfg: PrefTokenizeConfig) -> Any:
        return {"tokenizer": tokenizer_identity(cfg.tokenizer, "tokenizer")} if cfg.tokenizer else None

    @staticmethod
    def _parts(inputs: list[Artifact], cfg: PrefTokenizeConfig) -> tuple[Artifact, str, str]:
        pairs = pick(inputs, "pairs", ("pairs", "pref_ingest"))
        if pairs is None:
            raise StageInputError("inputs", "pref_tokenize reads preference pairs (the pairs or pref_ingest output)")
        tok = pick(inputs, "tokenizer", ("tokenizer", "train"))
        if tok is not None and cfg.tokenizer:
            raise StageInputError(
                "tokenizer", "a tokenizer artifact is an input already; set `tokenizer` only without one"
            )
        if tok is not None:
            return pairs, local_directory(tok.path), f"inputs.{tok.slot or 'tokenizer'}"
        if not cfg.tokenizer:
            raise StageInputError("tokenizer", "no tokenizer: wire a tokenizer (or a training run) or set a directory")
        return pairs, cfg.tokenizer, "tokenizer"

    def plan(self, inputs: list[Artifact], cfg: PrefTokenizeConfig) -> list[dict[str, Any]]:
        pairs, path, field = self._parts(inputs, cfg)
        tok = load_tokenizer(path, field)
        if tok.eos_token_id is None:
            raise StageInputError(field, "the tokenizer has no EOS token: a reply could not end")
        i = inputs.index(pairs)
        return [{"input": i, "shard": s} for s in range(len(pairs.shards()))]

    def encode(
        self,
        tok: Any,
        cfg: PrefTokenizeConfig,
        messages: list[dict[str, str]],
        replies: tuple[str, str],
        out: ArtifactWriter,
    ) -> tuple[list[list[int]], ...] | tuple[str, str]:
        """(chosen ids, chosen labels, rejected ids, rejected labels), or (reason, detail)."""
        try:
            text = render_prompt(messages, tok, cfg.template)
        except SftRecordError as e:
            return e.reason, e.detail
        prompt = encode_prompt(tok, text)
        bos = tok.bos_token_id
        sides = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in replies]
        longest = len(prompt) + max(len(s) for s in sides)
        if longest > cfg.max_length:
            if cfg.too_long == "reject":
                return "too_long", f"{longest} tokens > max_length {cfg.max_length}"
            head = [prompt[0]] if bos is not None and prompt and prompt[0] == bos else []
            keep = max(cfg.min_prompt_tokens, cfg.max_length - max(len(s) for s in sides))
            if len(prompt) > keep:
                prompt = head + prompt[len(prompt) - keep + len(head) :]
                out.count("prompts_truncated")
            room = cfg.max_length - len(prompt)
            if room < 1:
                return "too_long", f"the prompt alone needs {len(prompt)} tokens of max_length {cfg.max_length}"
            if any(len(s) > room for s in sides):
                out.count("replies_truncated")
            sides = [s[:room] for s in sides]
        c_ids, c_lab = _join(prompt, sides[0])
        r_ids, r_lab = _join(prompt, sides[1])
        return c_ids, c_lab, r_ids, r_lab

    def process(
        self, unit: dict[str, Any], inputs: list[Artifact], cfg: PrefTokenizeConfig, out: ArtifactWriter
    ) -> None:
        pairs, path, field = self._parts(inputs, cfg)
        tok = load_tokenizer(path, field)
        for batch in read_unit(
            pairs, unit, ["id", "prompt", "chosen", "rejected"], batch_rows=cfg.batch_rows, stats=out.stats
        ):
            splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
            for row in batch.to_pylist():
                encoded = self.encode(tok, cfg, load_messages(row["prompt"]), (row["chosen"], row["rejected"]), out)
                if len(encoded) == 2:
                    out.reject(*encoded, id=row["id"], meta=row["prompt"])
                    continue
                c_ids, c_lab, r_ids, r_lab = encoded
                split = "validation" if in_validation(row["id"], cfg.validation_fraction, cfg.split_seed) else "train"
                splits[split].append(
                    {
                        "id": row["id"],
                        "chosen_input_ids": c_ids,
                        "chosen_labels": c_lab,
                        "rejected_input_ids": r_ids,
                        "rejected_labels": r_lab,
                        "n_tokens": len(c_ids) + len(r_ids),
                    }
                )
            for split, rows in splits.items():
                if not rows:
                    continue
                table = pa.RecordBatch.from_pylist(rows, schema=PREF_TOKENS_SCHEMA)
                if split == "train":
                    out.write(table)
                else:
                    out.table("validation").write(table)
                    out.stats.rows_out += table.num_rows
                out.count(f"{split}.tokens", sum(r["n_tokens"] for r in rows))

    def finalize(self, inputs: list[Artifact], cfg: PrefTokenizeConfig, directory: str, fs: Any) -> dict[str, Any]:
        _, path, field = self._parts(inputs, cfg)
        base = directory.rstrip("/")
        shards = {
            "train": sorted(fs.glob(f"{base}/part-*.parquet")),
            "validation": sorted(fs.glob(f"{base}/validation/part-*.parquet")),
        }
        lengths = []
        for p in shards["train"]:
            with fs.open(p, "rb") as f:
                lengths += pq.read_table(f, columns=["n_tokens"]).column("n_tokens").to_pylist()
        splits = save_dataset_dict(fs, shards, HF_SCHEMA, f"{base}/hf")
        copy_tokenizer_files(path, fs, f"{base}/tokenizer")
        tok = load_tokenizer(path, field)
        return {
            "hf_dataset": {"path": "hf", "splits": splits},
            "tokenizer": {**tokenizer_info(tok), "copied_to": "tokenizer"},
            "preference": {
                "pairs_train": len(lengths),
                "max_length": cfg.max_length,
                "mean_pair_tokens": float(np.mean(lengths)) if lengths else 0.0,
            },
        }


def encode_prompt(tok: Any, text: str) -> list[int]:
    """A rendered prompt's token ids as generation and training both see them: the tokenizer's own BOS
    when it puts one before a text, exactly once (a chat template may write BOS as text too)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if bos is not None and (not ids or ids[0] != bos) and _adds_bos(tok):
        ids = [bos, *ids]
    return ids


def _adds_bos(tok: Any) -> bool:
    """Does the tokenizer itself start a text with BOS (its post-processor), as it would at inference?"""
    bos = tok.bos_token_id
    if bos is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
