"""What the user sends, checked before any model sees it: a bad value becomes a message in the UI, never a crash."""
from __future__ import annotations

import gradio as gr

from rwkv_lm.sampling import SamplingParams

# A demo on a shared CPU answers many people: one very long message would hold a worker for minutes.
MAX_MESSAGE_CHARS = 8_000


def check_message(message) -> str:
    """The message, or a gr.Error the user sees as a toast."""
    if not isinstance(message, str) or not message.strip():
        raise gr.Error("Type a message first.", title="Empty message")
    if len(message) > MAX_MESSAGE_CHARS:
        raise gr.Error(f"Your message has {len(message):,} characters; this demo takes at most {MAX_MESSAGE_CHARS:,}.",
                       title="Message too long")
    return message


def check_system_prompt(system) -> str:
    """The system prompt ('' for none), or a gr.Error."""
    if system is None:
        return ""
    if not isinstance(system, str) or len(system) > MAX_MESSAGE_CHARS:
        raise gr.Error(f"The system prompt takes at most {MAX_MESSAGE_CHARS:,} characters.", title="System prompt too long")
    return system


def sampling_params(max_tokens, temperature, top_p, top_k=0, presence_penalty=0.0, frequency_penalty=0.0,
                    seed=None) -> SamplingParams:
    """SamplingParams from the UI's controls; a negative or empty seed means a random one."""
    try:
        return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                              top_k=int(top_k), presence_penalty=float(presence_penalty),
                              frequency_penalty=float(frequency_penalty),
                              seed=None if seed is None or seed < 0 else int(seed))
    except (TypeError, ValueError) as e:
        raise gr.Error(str(e), title="Bad sampling setting") from None
