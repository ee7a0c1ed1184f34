"""Instruction (SFT) examples: validating Alpaca and chat records, and rendering them as text with the
character spans the model is trained on.

Two record shapes are understood, as in the GPT4-x-Alpaca data:
- Alpaca: `instruction`, optional `input`, `output` (strings);
- chat: `messages`, a list of `{"role", "content"}` turns (ShareGPT's `{"from", "value"}` with
  human / gpt roles is read too); roles are system (first only), user and assistant.

Both are normalised to a small JSON object (kept in the document's `meta["sft"]`). Rendering produces
the full text and the spans of the assistant's replies; everything outside them is prompt, masked out
of the labels by the tokenize stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class SftRecordError(ValueError):
    """A record that is not a usable instruction example; `reason` is the reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SftFields:
    """Which record fields hold what."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"


def _text_field(rec: dict[str, Any], name: str, required: bool) -> str:
    value = rec.get(name)
    if value is None:
        if required:
            raise SftRecordError("missing_field", f"no {name!r} field")
        return ""
    if not isinstance(value, str):
        raise SftRecordError("non_string_field", f"{name!r} is a {type(value).__name__}, not text")
    if required and not value.strip():
        raise SftRecordError("empty_field", f"{name!r} is empty")
    return value


def validate_messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise SftRecordError("bad_messages", f"{name!r} is a {type(value).__name__}, not a list of turns")
    if not value:
        raise SftRecordError("bad_messages", f"{name!r} is empty")
    turns = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise SftRecordError("bad_messages", f"{where} is a {type(turn).__name__}, not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise SftRecordError("missing_field", f"{where} needs 'role' and 'content'")
        if not isinstance(role, str) or not isinstance(content, str):
            bad = "role" if not isinstance(role, str) else "content"
            raise SftRecordError("non_string_field", f"{where}.{bad} is a {type(turn.get(bad)).__name__}, not text")
        if role not in _ROLE_ALIASES:
            raise SftRecordError("bad_messages", f"{where}.role {role!r} is not system, user or assistant")
        role = _ROLE_ALIASES[role]
        if role == "system" and i != 0:
            raise SftRecordError("bad_messages", f"{where} is a system turn after the first turn")
        if not content.strip():
            raise SftRecordError("empty_field", f"{where}.content is empty")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise SftRecordError("no_assistant_turn", f"{name!r} has no assistant turn to learn from")
    return turns


def normalize_sft_record(rec: Any, fields: SftFields = SftFields()) -> dict[str, Any]:
    """An Alpaca or chat record as `{"format": "alpaca", ...}` / `{"format": "chat", "messages": [...]}`;
    SftRecordError (with a reject reason) if it is neither."""
    if not isinstance(rec, dict):
        raise SftRecordError("not_an_object", f"record is a {type(rec).__name__}")
    if rec.get(fields.messages) is not None:
        return {"format": "chat", "messages": validate_messages(rec[fields.messages], fields.messages)}
    if fields.instruction in rec or fields.output in rec:
        return {
            "format": "alpaca",
            "instruction": _text_field(rec, fields.instruction, required=True),
            "input": _text_field(rec, fields.input, required=False),
            "output": _text_field(rec, fields.output, required=True),
        }
    raise SftRecordError(
        "missing_sft_fields",
        f"neither {fields.messages!r} nor {fields.instruction!r} + {fields.output!r} fields",
    )


def plain_text(example: dict[str, Any]) -> str:
    """The example's words without any template: what text filters (dedup, langid) look at."""
    if example["format"] == "alpaca":
        return "\n\n".join(p for p in (example["instruction"], example["input"], example["output"]) if p)
    return "\n\n".join(t["content"] for t in example["messages"])


def as_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    if example["format"] == "chat":
        return example["messages"]
    prompt = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}]


def render_alpaca(example: dict[str, Any], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """Alpaca prompt format. Each reply ends with the EOS token (trained: the model learns to stop)."""
    if example["format"] == "alpaca":
        if example["input"]:
            prompt = (
                f"{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{example['instruction']}\n\n"
                f"### Input:\n{example['input']}\n\n### Response:\n"
            )
        else:
            prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{example['instruction']}\n\n### Response:\n"
        text = prompt + example["output"] + eos_token
        return text, [(len(prompt), len(text))]
    turns = example["messages"]
    preamble = turns[0]["content"] if turns[0]["role"] == "system" else ALPACA_PREAMBLE
    text = preamble + "\n\n"
    spans: list[tuple[int, int]] = []
    for turn in turns:
        if turn["role"] == "user":
            text += ("\n\n" if spans else "") + f"### Instruction:\n{turn['content']}\n\n### Response:\n"
        elif turn["role"] == "assistant":
            start = len(text)
            text += turn["content"] + eos_token
            spans.append((start, len(text)))
    return text, spans


def render_prompt(messages: list[dict[str, str]], tokenizer: Any, template: str = "auto") -> str:
    """The text a model continues to reply to a conversation that ends with a user turn: the chat
    template with its generation prompt, or the Alpaca prompt (`template`: auto picks the chat
    template when the tokenizer has one). The same text generation and preference training use."""
    if template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None)):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise SftRecordError("chat_template_error", f"{type(e).__name__}: {e}") from e
    text, _ = render_alpaca({"format": "chat", "messages": messages}, tokenizer.eos_token or "")
    return text


def render_chat_template(example: dict[str, Any], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The tokenizer's chat template. An assistant turn's span is what rendering it adds to the
    conversation before it (with the generation prompt): its content plus the template's end-of-turn
    marker, so the model learns to end its turn."""
    messages = as_messages(example)

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        if not turns:
            return ""
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # templates raise on role orders they do not support
            raise SftRecordError("chat_template_error", f"{type(e).__name__}: {e}") from e

    full = render(messages, False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise SftRecordError(
                "chat_template_not_incremental",
                f"rendering turn {i} changes the text before it, so its tokens cannot be told from the prompt's",
            )
        spans.append((len(before), len(through)))
    return full, spans
