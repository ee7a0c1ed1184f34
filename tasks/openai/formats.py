"""OpenAI's fine-tuning file formats, and the rules an example must follow to go into one.

- chat (supervised): one JSON object per line, `{"messages": [{"role", "content"}, ...]}`; roles are
  system (first turn only), user and assistant, and the example ends with the assistant's reply;
- preference (DPO): `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
  "content": ...}], "non_preferred_output": [...]}`; the input ends with the user's turn.

Each rule has a name that is the reject reason of an example that breaks it (`RuleBroken.rule`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CHAT_ROLES = ("system", "user", "assistant")

# rule -> what it asks; the README lists them, the tests break each one
RULES: dict[str, str] = {
    "not_a_message_list": "the conversation is a non-empty list of {role, content} objects",
    "role_not_allowed": "every role is system, user or assistant",
    "bad_content": "every turn's content is text",
    "empty_content": "no turn is empty",
    "system_not_first": "a system turn comes first, if at all",
    "no_assistant_turn": "a chat example has an assistant reply to learn",
    "last_turn_not_assistant": "a chat example ends with the assistant's reply",
    "prompt_not_ending_with_user": "a preference prompt ends with the user's turn",
    "empty_reply": "both preference replies are non-empty text",
    "identical_replies": "the preferred and the non-preferred reply differ",
    "too_many_tokens": "an example fits the model's training context (tokens per example)",
    "duplicate_example": "an example appears once",
}


class RuleBroken(ValueError):
    """An example that breaks one of OpenAI's rules; `rule` is the reject reason."""

    def __init__(self, rule: str, detail: str):
        assert rule in RULES, rule
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


def check_messages(messages: Any, what: str = "messages") -> list[dict[str, str]]:
    """The turns as `{"role", "content"}` dicts, or RuleBroken naming the first rule they break."""
    if not isinstance(messages, list):
        raise RuleBroken("not_a_message_list", f"{what} is a {type(messages).__name__}, not a list of turns")
    if not messages:
        raise RuleBroken("not_a_message_list", f"{what} is empty")
    turns = []
    for i, turn in enumerate(messages):
        where = f"{what}[{i}]"
        if not isinstance(turn, dict):
            raise RuleBroken("not_a_message_list", f"{where} is a {type(turn).__name__}, not an object")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise RuleBroken("role_not_allowed", f"{where}.role is {role!r}, not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise RuleBroken("bad_content", f"{where}.content is {type(content).__name__}, not text")
        if not content.strip():
            raise RuleBroken("empty_content", f"{where}.content is empty")
        if role == "system" and i:
            raise RuleBroken("system_not_first", f"{where} is a system turn after the first turn")
        turns.append({"role": role, "content": content})
    return turns


def chat_record(messages: Any) -> dict[str, Any]:
    turns = check_messages(messages)
    if not any(t["role"] == "assistant" for t in turns):
        raise RuleBroken("no_assistant_turn", "no assistant reply to learn from")
    if turns[-1]["role"] != "assistant":
        raise RuleBroken("last_turn_not_assistant", f"the last turn is the {turns[-1]['role']}'s")
    return {"messages": turns}


def preference_record(prompt: Any, chosen: Any, rejected: Any) -> dict[str, Any]:
    turns = check_messages(prompt, "prompt")
    if turns[-1]["role"] != "user":
        raise RuleBroken("prompt_not_ending_with_user", f"the prompt's last turn is the {turns[-1]['role']}'s")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(reply, str) or not reply.strip():
            raise RuleBroken("empty_reply", f"the {name} reply is {'empty' if isinstance(reply, str) else 'missing'}")
    if chosen.strip() == rejected.strip():
        raise RuleBroken("identical_replies", "the chosen and the rejected reply are the same text")
    return {
        "input": {"messages": turns},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def record_line(record: dict[str, Any]) -> str:
    """One JSONL line (UTF-8 text as is; no trailing newline)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def record_key(record: dict[str, Any]) -> bytes:
    """Identity of an example's content, for exact-duplicate detection."""
    return hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()
