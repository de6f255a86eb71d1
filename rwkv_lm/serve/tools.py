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
import re
import uuid
from dataclasses import dataclass

from .grammar import Grammar, json_rule

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
INSTRUCTIONS = ("You may call these functions. To call one, answer with "
                '<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one per line.')
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)


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


def parse_calls(text: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
    """A reply -> (its text outside the calls, or None if nothing is left; the calls to functions offered).
    A tag that does not hold {"name": an offered function, "arguments": an object} stays in the text."""
    offered = {t["name"] for t in tools}
    calls, kept, end = [], [], 0
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not (isinstance(call, dict) and call.get("name") in offered and isinstance(call.get("arguments", {}), dict)):
            continue
        kept.append(text[end:match.start()])
        end = match.end()
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"],
                              json.dumps(call.get("arguments", {}), ensure_ascii=False)))
    rest = ("".join(kept) + text[end:]).strip()
    return (rest or None), calls


def maybe_call(text: str) -> bool:
    """Could `text` (a reply so far) still become a tool call? (Streaming holds such text back.)"""
    text = text.lstrip()
    return text.startswith(CALL_OPEN) or CALL_OPEN.startswith(text)


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
