"""What the user sends, checked before any model sees it: a bad value becomes a message in the UI, never a crash."""
from __future__ import annotations

import gradio as gr

from rwkv_lm.chat import CHAT_DEFAULTS
from rwkv_lm.sampling import SamplingError, SamplingParams

# A demo on a shared CPU answers many people: one very long message would hold a worker for minutes.
MAX_MESSAGE_CHARS = 8_000


class UserError(gr.Error):
    """A bad input, shown to the user as a toast (or to an API client as the error), with no traceback in the
    server's console: nothing went wrong there."""

    def __init__(self, message: str, title: str = "Error"):
        super().__init__(message, title=title, print_exception=False)


def named_errors(component, name: str):
    """`component`, whose rejected API values (Gradio checks a slider's type and range before any handler runs,
    and names it by its position) become a UserError naming the field `name`."""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error as e:  # out of the control's range
            raise UserError(f"{name}: {e.message}", title="Bad sampling setting") from None
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {payload!r}", title="Bad sampling setting") from None

    component.preprocess = checked
    return component


def check_message(message) -> str:
    """The message, or a UserError the user sees as a toast."""
    if not isinstance(message, str) or not message.strip():
        raise UserError("Type a message first.", title="Empty message")
    if len(message) > MAX_MESSAGE_CHARS:
        raise UserError(f"Your message has {len(message):,} characters; this demo takes at most {MAX_MESSAGE_CHARS:,}.",
                       title="Message too long")
    return message


def check_system_prompt(system) -> str:
    """The system prompt ('' for none), or a UserError."""
    if system is None:
        return ""
    if not isinstance(system, str) or len(system) > MAX_MESSAGE_CHARS:
        raise UserError(f"The system prompt takes at most {MAX_MESSAGE_CHARS:,} characters.", title="System prompt too long")
    return system


def sampling_params(max_tokens, temperature, top_p, top_k=0, presence_penalty=0.0, frequency_penalty=0.0,
                    seed=None) -> SamplingParams:
    """SamplingParams from the UI's controls (the chat defaults' penalty decay); a negative or empty seed means a
    random one. A bad value is a UserError that names the field as the API calls it."""
    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    settings = {}
    for name, value in given.items():
        kind = int if name in ("max_tokens", "top_k") else float
        try:
            settings[name] = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {value!r}", title="Bad sampling setting") from None
    if seed is not None and not isinstance(seed, (int, float)):
        raise UserError(f"seed must be a whole number (-1: random), got {seed!r}", title="Bad sampling setting")
    try:
        return SamplingParams(**settings, penalty_decay=CHAT_DEFAULTS.penalty_decay,
                              seed=None if seed is None or seed < 0 else int(seed))
    except SamplingError as e:
        raise UserError(e.reason, title="Bad sampling setting") from None
