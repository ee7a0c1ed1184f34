"""Prompts and preference data in.

- `prompts`: instruction / chat records (the SFT formats: Alpaca `instruction` + `input`, chat
  `messages`), records with a `prompt` field, or plain text files with one prompt per line -> prompt
  documents. A chat record that ends with the assistant's turn gives the conversation before it.
- `pref_ingest`: preference datasets -> preference pairs (tasks/prefs/schema.py PAIRS_SCHEMA). Read:
  `{prompt, chosen, rejected}` with text replies; UltraFeedback-style message lists (`chosen` and
  `rejected` are conversations that share their prompt turns); `{messages, chosen, rejected}`; and
  Anthropic HH-style text pairs (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`, the prompt being the common
  part before the last assistant turn). A record that is no usable pair is a reject with the reason:
  `missing_side`, `empty_reply`, `identical_replies`, `bad_prompt`, `prompts_differ`, ...
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field

from tasks.documents import meta_json
from tasks.ingest.stage import IngestConfig, IngestStage, RecordEmitter, preview_record
from tasks.prefs.schema import PAIRS_SCHEMA, messages_json, prompt_text
from tasks.tokenize.sft import SftFields, SftRecordError, as_messages, normalize_sft_record, validate_messages


class PromptsConfig(IngestConfig):
    """Where the prompts come from and which fields hold them."""

    prompt_field: str = Field("prompt", description="A record field holding the prompt as text.")
    system_field: str | None = Field(None, description="A record field holding a system message, if any.")
    instruction_field: str = Field("instruction", description="Alpaca: the task.")
    input_field: str = Field("input", description="Alpaca: optional context for the task.")
    output_field: str = Field("output", description="Alpaca: the reference reply (not part of the prompt).")
    messages_field: str = Field("messages", description="Chat: the conversation; its last user turn ends the prompt.")
    text_lines: bool = Field(True, description="A plain text file holds one prompt per non-empty line.")


class PromptEmitter(RecordEmitter):
    cfg: PromptsConfig

    def messages_of(self, rec: dict[str, Any]) -> list[dict[str, str]]:
        cfg = self.cfg
        prompt = rec.get(cfg.prompt_field)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise SftRecordError("non_string_field", f"{cfg.prompt_field!r} is a {type(prompt).__name__}")
            if not prompt.strip():
                raise SftRecordError("empty_field", f"{cfg.prompt_field!r} is empty")
            messages = [{"role": "user", "content": prompt}]
        elif rec.get(cfg.messages_field) is not None:
            raw = rec[cfg.messages_field]
            if isinstance(raw, list) and raw and isinstance(raw[-1], dict) and raw[-1].get("role") in ("user", "human"):
                raw = [*raw, {"role": "assistant", "content": "-"}]  # the validator wants a reply; dropped below
            messages = validate_messages(raw, cfg.messages_field)
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            fields = SftFields(cfg.instruction_field, cfg.input_field, cfg.output_field, cfg.messages_field)
            example = normalize_sft_record({cfg.output_field: "-", **rec}, fields)
            messages = as_messages(example)[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise SftRecordError("bad_prompt", "the conversation has no user turn to reply to")
        system = rec.get(cfg.system_field) if cfg.system_field else None
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return messages

    def record(self, rec: Any, where: dict[str, Any]) -> None:
        if not isinstance(rec, dict):
            return self.reject("not_an_object", f"record is a {type(rec).__name__}", preview_record(rec), where)
        try:
            messages = self.messages_of(rec)
        except SftRecordError as e:
            return self.reject(e.reason, e.detail, preview_record(rec), where)
        meta = {"prompt": messages, "_ingest": where}
        self.keep(
            id=self.document_id(rec, where),
            text=prompt_text(messages),
            source=self.label,
            url=None,
            lang=None,
            meta=meta_json(meta),
        )


class PromptsStage(IngestStage):
    name = "prompts"
    version = 1
    Config = PromptsConfig
    emitter = PromptEmitter

    def _read_file(self, unit: dict[str, Any], cfg: PromptsConfig, out: Any) -> None:
        if unit["format"] != "text" or not cfg.text_lines:
            return super()._read_file(unit, cfg, out)
        out.stats.bytes_in += unit["size"]
        em = self.emitter(cfg, out, cfg.source or unit["path"])
        try:
            with open(unit["path"], encoding="utf-8-sig", errors="strict") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        em.record({cfg.prompt_field: line.rstrip("\r\n")}, {"file": em.label, "line": line_no})
        except UnicodeDecodeError as e:
            em.reject("invalid_utf8", str(e), None, {"file": em.label})
        except OSError as e:
            em.reject("unreadable_file", f"{type(e).__name__}: {e}", None, {"file": em.label})
        em.flush()
        out.count("files")


# --------------------------------------------------------------------------------------------------
# preference datasets


class PrefIngestConfig(IngestConfig):
    """Where the preference pairs come from and which fields hold them."""

    prompt_field: str = Field("prompt", description="The prompt: text, or a list of chat turns.")
    messages_field: str = Field("messages", description="Or the conversation before the replies.")
    chosen_field: str = Field("chosen", description="The preferred reply: text, or a conversation ending with it.")
    rejected_field: str = Field("rejected", description="The other reply, in the same form.")
    score_fields: tuple[str, str] | None = Field(
        None, description="Fields with the chosen and rejected replies' scores, if the data has them."
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(text: str) -> list[dict[str, str]]:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat turns."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = []
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return turns


class PairEmitter(RecordEmitter):
    """Records become preference pairs (PAIRS_SCHEMA rows), or rejects with the reason."""

    cfg: PrefIngestConfig
    schema = PAIRS_SCHEMA

    def _side(self, rec: dict[str, Any], field: str) -> Any:
        value = rec.get(field)
        if value is None or (isinstance(value, (str, list)) and not value):
            raise SftRecordError("missing_side", f"no {field!r}")
        return value

    def pair_of(self, rec: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
        cfg = self.cfg
        chosen, rejected = self._side(rec, cfg.chosen_field), self._side(rec, cfg.rejected_field)
        prompt = rec.get(cfg.prompt_field, rec.get(cfg.messages_field))
        if isinstance(chosen, list) and isinstance(rejected, list):  # conversations that end with the replies
            c, r = validate_messages(chosen, cfg.chosen_field), validate_messages(rejected, cfg.rejected_field)
            if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
                raise SftRecordError("bad_reply", "a conversation side does not end with the assistant's reply")
            if c[:-1] != r[:-1]:
                raise SftRecordError("prompts_differ", "the chosen and rejected conversations differ before the reply")
            messages = c[:-1]
            if not messages and prompt is not None:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return _prompt(messages), c[-1]["content"], r[-1]["content"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise SftRecordError("non_string_field", "chosen and rejected must both be text or both conversations")
        if prompt is None and "Assistant:" in chosen:  # HH: the prompt is inside both sides
            c, r = _hh_messages(chosen), _hh_messages(rejected)
            if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
                raise SftRecordError("bad_reply", "an HH side does not end with an Assistant turn")
            if c[:-1] != r[:-1]:
                raise SftRecordError("prompts_differ", "the chosen and rejected dialogues differ before the reply")
            return _prompt(c[:-1]), c[-1]["content"], r[-1]["content"]
        if prompt is None:
            raise SftRecordError("bad_prompt", f"no {cfg.prompt_field!r} or {cfg.messages_field!r} field")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = validate_messages([*prompt, {"role": "assistant", "content": "-"}], cfg.messages_field)[:-1]
        return _prompt(messages), chosen, rejected

    def record(self, rec: Any, where: dict[str, Any]) -> None:
        cfg = self.cfg
        if not isinstance(rec, dict):
            return self.reject("not_an_object", f"record is a {type(rec).__name__}", preview_record(rec), where)
        try:
            messages, chosen, rejected = self.pair_of(rec)
        except SftRecordError as e:
            return self.reject(e.reason, e.detail, preview_record(rec), where)
        if not chosen.strip() or not rejected.strip():
            return self.reject("empty_reply", "a reply is empty", preview_record(rec), where)
        if chosen.strip() == rejected.strip():
            return self.reject("identical_replies", "chosen and rejected are the same text", preview_record(rec), where)
        scores: tuple[Any, Any] = (None, None)
        if cfg.score_fields:
            scores = tuple(_float_or_none(rec.get(f)) for f in cfg.score_fields)
        taken = {cfg.id_field, cfg.prompt_field, cfg.messages_field, cfg.chosen_field, cfg.rejected_field}
        meta = {k: v for k, v in rec.items() if k not in taken}
        meta["_ingest"] = where
        self.keep(
            id=self.document_id(rec, where),
            prompt=messages_json(messages),
            chosen=chosen,
            rejected=rejected,
            chosen_score=scores[0],
            rejected_score=scores[1],
            source=self.label,
            meta=json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str),
        )


def _prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages or messages[-1]["role"] != "user":
        raise SftRecordError("bad_prompt", "the prompt does not end with a user turn")
    return messages


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class PrefIngestStage(IngestStage):
    name = "pref_ingest"
    version = 1
    Config = PrefIngestConfig
    emitter = PairEmitter
