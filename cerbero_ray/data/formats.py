"""Input formats → one canonical document: a chat (``messages``) or a plain text.

Accepted, per source (``format: auto`` picks from the first valid rows):
  openai    {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
  alpaca    {"instruction": str, "input": str (optional), "output": str}
  text      {"<text_field>": str}  (JSONL/Parquet), or a whole .txt file

A row that cannot become a valid document raises :class:`Reject` with a short machine-readable
reason; the pipeline writes it to the rejects file and counts it. Pure Python, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cerbero_ray.chat import forges_turn

FORMATS = ("openai", "sharegpt", "alpaca", "text")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


class Reject(Exception):
    """A row that cannot be used; ``reason`` is one of a small fixed set of strings."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Document:
    """``messages`` for a chat, ``text`` for a plain document (exactly one is set)."""

    messages: list[dict] | None = None
    text: str | None = None


def detect_format(record: dict, text_field: str = "text") -> str | None:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if text_field in record:
        return "text"
    return None


def _text(value, what: str) -> str:
    if value is None:
        raise Reject("missing_field", what)
    if not isinstance(value, str):
        raise Reject("wrong_type", f"{what} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\\ud800" escape
        raise Reject("invalid_utf8", what) from None
    if not value.strip():
        raise Reject("empty_text", what)
    return value


def _turns(items, role_key: str, content_key: str, roles: dict[str, str], field: str) -> list[dict]:
    if not isinstance(items, list):
        raise Reject("missing_field" if items is None else "wrong_type", f"{field} must be a list")
    if not items:
        raise Reject("empty_text", f"{field} is empty")
    messages = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise Reject("wrong_type", f"{field}[{i}] is not an object")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise Reject("unknown_role", f"{field}[{i}].{role_key}={role!r}")
        content = _text(turn.get(content_key), f"{field}[{i}].{content_key}")
        if forges_turn(content):
            # the cerbero format marks turns with these at a line's start: the loss mask would be wrong
            raise Reject("role_tag_in_text", f"{field}[{i}].{content_key} has a line starting with a role tag")
        messages.append({"role": roles[role], "content": content})
    return messages


def check_turns(messages: list[dict]) -> list[dict]:
    """An optional leading system turn, then user/assistant alternating from a user turn, ending
    with an assistant turn (a trailing user turn trains nothing and is a sign of a cut record)."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise Reject("no_assistant_turn", "only a system message")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise Reject("non_alternating", f"turn {i} is {m['role']}, expected {expected}")
    if turns[-1]["role"] != "assistant":
        raise Reject("no_assistant_turn", "the conversation ends with a user turn")
    return messages


def to_document(record: dict, fmt: str, text_field: str = "text") -> Document:
    """The canonical document for ``record`` in format ``fmt``, or :class:`Reject`."""
    if not isinstance(record, dict):
        raise Reject("wrong_type", "row is not an object")
    if fmt == "text":
        return Document(text=_text(record.get(text_field), text_field))
    if fmt == "openai":
        msgs = _turns(record.get("messages"), "role", "content", OPENAI_ROLES, "messages")
    elif fmt == "sharegpt":
        msgs = _turns(record.get("conversations"), "from", "value", SHAREGPT_ROLES, "conversations")
    elif fmt == "alpaca":
        prompt = _text(record.get("instruction"), "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise Reject("wrong_type", "input is not a string")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{_text(extra, 'input')}"
        msgs = _turns(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.get("output")}],
            "role",
            "content",
            OPENAI_ROLES,
            "alpaca",
        )
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return Document(messages=check_turns(msgs))


def parse_raw(kind: str, raw: bytes, fmt: str, text_field: str = "text") -> Document:
    """The document of one raw row (``kind`` as the source reader names it: ``jsonl``, ``record``,
    ``txt``, ``unreadable``) in format ``fmt``, or :class:`Reject`."""
    if kind == "unreadable":  # what the reader could not read: a Parquet row group, a cut stream
        raise Reject("unreadable_file", raw.decode("utf-8", "replace"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("invalid_utf8", str(e)) from None
    if kind == "jsonl" and not text.strip():
        raise Reject("empty", "a blank line")
    if kind == "txt":
        if not text.strip():
            raise Reject("empty_text", "file is empty")
        return Document(text=text)
    try:
        record = json.loads(text)
    except ValueError as e:
        raise Reject("invalid_json", str(e)[:200]) from None
    except RecursionError:
        raise Reject("invalid_json", "nested deeper than the JSON parser allows") from None
    return to_document(record, fmt, text_field)
