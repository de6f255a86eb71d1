"""Tool calls in the chat template: how offered functions, the assistant's calls and the tools' results are
written for the model, how calls are read back from its reply, and the grammar that makes a reply a call.

The format (Hermes-style tags inside the RWKV chat template's turns):

    System: {system text}
    You may call these functions. To call one, answer with <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one per line.
    <tools>{"name": ..., "description": ..., "parameters": {...}} ...</tools>

    User: What is the weather in Paris?

    Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

    User: <tool_response>{"name": "get_weather", "content": "18 C, sunny"}</tool_response>

    Assistant: It is 18 C and sunny in Paris.

An assistant message with `tool_calls` is written as its calls (after its text, if any); a `tool` message is
a user turn holding a <tool_response>. JSON is written on one line (a blank line would end the turn).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .grammar import Grammar, json_rule

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
INSTRUCTIONS = ("You may call these functions. To call one, answer with "
                '<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one per line.')


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`); grows while the call is read
    complete: bool = False  # its arguments are whole


def render_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """OpenAI chat messages (with tool calls and tool results, and `tools`: the functions offered, each
    {"name", "description", "parameters"}) -> plain {role, content} messages for the chat template."""
    names = {}  # tool_call_id -> function name, to say which function a result answers
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call["function"]
                names[call.get("id")] = function["name"]
                calls.append(call_text(function["name"], _arguments(function.get("arguments"))))
            content = "\n".join([content, *calls] if content else calls)
        elif role == "tool":
            result = {"name": names.get(m.get("tool_call_id"), m.get("name")), "content": content}
            role, content = "user", f"<tool_response>{json.dumps(result, ensure_ascii=False)}</tool_response>"
        if content or role != "assistant":  # an assistant turn with no content and no calls adds no text
            out.append({"role": role, "content": content})
    if tools:
        offer = INSTRUCTIONS + "\n<tools>" + " ".join(json.dumps(t, ensure_ascii=False) for t in tools) + "</tools>"
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n" + offer}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out


def call_text(name: str, arguments: dict) -> str:
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{CALL_CLOSE}"


def _arguments(text) -> dict:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"tool_calls: function.arguments must be a JSON object as text, got {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"tool_calls: function.arguments must be a JSON object, got {text!r}")
    return value


class CallReader:
    """Reads the calls out of a reply as it streams: `feed(text)` and `finish()` return events, in order:
    ("content", text); ("call", i) when call i begins (`calls[i]` has its id and name, arguments ""); ("arguments",
    i, text) for each next piece of call i's arguments, as the model writes them.

    A call is <tool_call>{"name": an offered function, "arguments": {...}}</tool_call>: the arguments stream from
    their first brace to the one that closes them (a JSON scan, strings and escapes included), so nothing is held
    back but the tag's own text. A tag that does not begin so stays in the text; arguments are the model's own
    text, as OpenAI's are (valid JSON is the grammar's job, under tool_choice 'required' or a named function).
    The whitespace around a call is content only between two texts. Read whole or in pieces split anywhere, a reply
    gives the same.
    """

    def __init__(self, tools: list[dict]):
        self.offered = {t["name"] for t in tools}
        self.calls: list[ToolCall] = []
        self.content = ""  # the text outside the calls, as given out so far
        self._held, self._gap, self._mode, self._after_call = "", "", _TEXT, False
        self._depth, self._in_string, self._escaped = 0, False, False

    @property
    def complete(self) -> bool:
        """Some calls were read and every one's arguments are whole."""
        return bool(self.calls) and all(c.complete for c in self.calls)

    def feed(self, text: str) -> list[tuple]:
        self._held += text
        return self._advance(final=False)

    def finish(self) -> list[tuple]:
        """The events the rest of the reply makes (no more text comes)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[tuple]:
        events: list[tuple] = []

        def content(text):
            if text:
                self.content += text
                events.append(("content", text))

        while True:
            if self._mode is _TEXT:
                if self._after_call and not self.content:  # (later, whitespace between texts is kept)
                    self._held = self._held.lstrip()
                    if not self._held:
                        break
                    self._after_call = False
                opened = self._held.find(CALL_OPEN)
                if opened >= 0:
                    before = self._held[:opened]
                    content(before.rstrip())
                    self._gap, self._held, self._mode = before[len(before.rstrip()):], self._held[opened + len(CALL_OPEN):], _HEADER
                    continue
                if final:  # (trailing whitespace is text, unless the reply made calls)
                    cut = len(self._held.rstrip() if self.calls else self._held)
                else:
                    cut = _undecided_tail(self._held)
                content(self._held[:cut])
                self._held = self._held[cut:]
                break
            if self._mode is _HEADER:
                found = _match(self._held, _HEADER_ITEMS)
                if found is _PARTIAL and not final:
                    break
                if found in (None, _PARTIAL) or found[1][0] not in self.offered:  # not a call: the tag is text
                    content(self._gap + CALL_OPEN)
                    self._mode = _TEXT
                    continue
                end, (name,) = found
                self.calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, ""))
                events.append(("call", len(self.calls) - 1))
                self._held, self._mode = self._held[end - 1:], _ARGUMENTS  # from the arguments' brace
                self._depth, self._in_string, self._escaped = 0, False, False
                continue
            if self._mode is _ARGUMENTS:
                end = self._scan()
                piece, self._held = self._held[:end], self._held[end:]
                if piece:
                    call = self.calls[-1]
                    call.arguments += piece
                    events.append(("arguments", len(self.calls) - 1, piece))
                if self._depth:
                    break
                self.calls[-1].complete, self._mode = True, _CLOSE
                continue
            found = _match(self._held, _CLOSE_ITEMS)  # _CLOSE: the call's closing brace and tag
            if found is _PARTIAL:
                if final:
                    self._held = ""
                break
            if found is not None:
                self._held, self._after_call = self._held[found[0]:], True
            self._mode = _TEXT  # (after a call that did not close as it should, what follows is text)
        return events

    def _scan(self) -> int:
        """How much of the held text belongs to the arguments (all of it until their closing brace)."""
        for i, ch in enumerate(self._held):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(self._held)


_TEXT, _HEADER, _ARGUMENTS, _CLOSE = "text", "header", "arguments", "close"
_STRING, _PARTIAL = object(), object()  # a JSON string in a pattern; text that may still match
_HEADER_ITEMS = ("{", '"name"', ":", _STRING, ",", '"arguments"', ":", "{")
_CLOSE_ITEMS = ("}", CALL_CLOSE)


def _match(text: str, items) -> tuple[int, list] | object | None:
    """Match `items` (literals, or _STRING: a JSON string) at the start of `text`, whitespace allowed before each
    -> (the end, the strings' values); _PARTIAL if the text ends while it still matches; None if it cannot."""
    i, values = 0, []
    for item in items:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i == len(text):
            return _PARTIAL
        if item is _STRING:
            if text[i] != '"':
                return None
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= len(text):
                return _PARTIAL
            try:
                values.append(json.loads(text[i:j + 1]))
            except json.JSONDecodeError:
                return None
            i = j + 1
        else:
            given = text[i:i + len(item)]
            if not item.startswith(given):
                return None
            if len(given) < len(item):
                return _PARTIAL
            i += len(item)
    return i, values


def _undecided_tail(text: str) -> int:
    """Where the text that may still be part of a call begins: a tail that could begin <tool_call>, and the
    whitespace before it (whitespace before a call is not content)."""
    cut = len(text)
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            cut = len(text) - n
            break
    while cut and text[cut - 1].isspace():
        cut -= 1
    return cut


def read_calls(text: str, tools: list[dict]) -> CallReader:
    """A whole reply read (`reader.content`, `reader.calls`)."""
    reader = CallReader(tools)
    reader.feed(text)
    reader.finish()
    return reader


def calls_grammar(tools: list[dict], parallel: bool, end: str) -> Grammar:
    """Replies that are only calls to `tools` (one, or one per line if `parallel`) with arguments valid against
    each function's JSON schema, then `end` (the template's end of turn)."""
    choices = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                 "arguments": t.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    repeat = ' ("\\n" call)*' if parallel else ""
    return Grammar(f"start: call{repeat} {json.dumps(end)}\n"
                   f"call: {json.dumps(CALL_OPEN)} {json_rule(schema)} {json.dumps(CALL_CLOSE)}\n")
