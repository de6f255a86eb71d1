"""The chat template of RWKV World / G1 models, as text: what a conversation looks like to the model.

    System: {system}\n\nUser: {message}\n\nAssistant: {reply}\n\nUser: ...

A blank line ends every turn, so a message's own blank lines are collapsed (`clean_message`). Used by chat
sessions, the HTTP server (OpenAI messages) and the trainer (conversations to fine-tune on).
"""
from __future__ import annotations

import re

TURN_END = "\n\n"  # a reply ends here; the template uses it between all parts
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def clean_message(text: str, role: str) -> str:
    """Strip a message and collapse runs of newlines: a blank line would end the turn early."""
    if not isinstance(text, str):
        raise ValueError(f"{role} message must be a str, got {type(text).__name__}")
    text = re.sub(r"\n+", "\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not text:
        raise ValueError(f"{role} message is empty; write something to send")
    return text


def turn_text(role: str, text: str) -> str:
    """One finished turn of the template: "User: …\\n\\n"."""
    return f"{ROLES[role]}: {text}{TURN_END}"


REPLY_CUE = f"{ROLES['assistant']}:"  # what the model continues from; encoded with the turn before it


def render_chat(messages: list[dict]) -> list[tuple[str, bool]]:
    """A whole conversation in the template, as (text, is assistant reply) pieces (for fine-tuning).

    Each reply piece (" …\\n\\n") is exactly what the model generates after the cue, its end marker
    included; the cue joins the turn before it, as `ChatSession` encodes them together.
    """
    pieces = []
    for m in messages:
        text = clean_message(m["content"], m["role"])
        if m["role"] != "assistant":
            pieces.append((turn_text(m["role"], text), False))
            continue
        if pieces and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + REPLY_CUE, False)
        else:
            pieces.append((REPLY_CUE, False))
        pieces.append((f" {text}{TURN_END}", True))
    return pieces


def render_prompt(messages: list[dict]) -> str:
    """A conversation (OpenAI-style messages: role, content) as the text the model continues with a reply."""
    return "".join(text for text, _ in render_chat(messages)) + REPLY_CUE
