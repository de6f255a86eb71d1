"""What one request, one connection and the whole server may take: each a flag of `rwkv-lm serve` (this module
needs no server package, so the command line can show the defaults)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The server's limits (in brackets the flag that sets each)."""

    max_prompt_tokens: int = 32_768  # a longer prompt gets 413 (--max-prompt-tokens)
    max_tokens: int = 16_384  # a larger max_tokens gets 400 (--max-tokens-limit)
    max_stop_chars: int = 1_000  # a longer stop string gets 400 (--max-stop-chars)
    max_body_bytes: int = 4 << 20  # a larger body gets 413, unread (--max-body-mb)
    body_timeout_s: float = 30.0  # a body not all in by then gets 408 (--body-timeout)
    header_timeout_s: float = 10.0  # a connection whose request head is not in by then is closed (--header-timeout)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this (--keep-alive)
    max_connections: int = 1_024  # beyond this many open connections, a new one gets 503 (--max-connections)
    shutdown_timeout_s: float = 10.0  # streams run this long after SIGTERM, then end (--shutdown-timeout)
    stall_s: float = 60.0  # /health answers 503 once one engine iteration has run this long (--health-stall)

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"the limit {name} must be > 0, got {value}")


def max_token_bytes(tokenizer) -> int:
    """The longest token's length in bytes: a text of n bytes has at least n / this many tokens."""
    longest = 1
    for i in range(tokenizer.vocab_size):
        try:
            longest = max(longest, len(tokenizer.token_bytes(i)))
        except ValueError:  # an id with no bytes (a special token)
            continue
    return longest
