"""Which replica answers a request, when several serve one model (`rwkv_lm.serve.cluster`): the choice itself,
free of Ray, so that it can be read and tested on its own.

An RWKV conversation's whole history is one small state in the prefix cache of the replica that last answered
it; a follow-up turn sent anywhere else reads the whole conversation again. So each request gets an affinity
key that stays the same over a conversation's turns:

1. a session named by the client: the `X-Session-Id` header, else OpenAI's `prompt_cache_key`, else `user`;
2. else, for chat completions, the rendered messages up to the first user message (a later turn re-sends them
   unchanged); for completions, the prompt's first `COMPLETION_KEY_CHARS` characters.

The key picks its replica by rendezvous hashing (the highest hash of key and replica rank): every router
picks the same replica without sharing any table, and a replica that goes away moves only its own keys.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..chat_template import render_prompt

SESSION_HEADER = "x-session-id"
COMPLETION_KEY_CHARS = 256  # a completions conversation whose first prompt is shorter should name a session


@dataclass(frozen=True)
class Route:
    """A request's routing hint, handed to the router with the request: its affinity key (None: the least
    loaded replica), or `rank`, a replica asked for by rank (the gateway's /health and /metrics ask each)."""

    key: str | None = None
    rank: int | None = None


def affinity_key(path: str, body: bytes, headers: dict[str, str]) -> str | None:
    """The key that keeps a conversation on one replica; None where the request names no conversation (or
    its body is not a request this server takes: the replica that gets it answers the error)."""
    session = headers.get(SESSION_HEADER)
    if session:
        return "session:" + session
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return None
    try:
        request = json.loads(body)
        for field in ("prompt_cache_key", "user"):
            if isinstance(request.get(field), str) and request[field]:
                return f"{field}:{request[field]}"
        if path == "/v1/completions":
            prompt = request["prompt"]
            prompt = prompt[0] if isinstance(prompt, list) else prompt
            return "prompt:" + prompt[:COMPLETION_KEY_CHARS]
        messages = request["messages"]
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        return "chat:" + render_prompt(messages[:first_user + 1])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, StopIteration):
        return None


def rendezvous(key: str, ranks: list[int]) -> int:
    """The rank, among `ranks`, that `key` belongs to: the highest hash of (key, rank)."""
    def score(rank: int) -> bytes:
        return hashlib.blake2b(f"{rank}\0{key}".encode(), digest_size=8).digest()

    return max(ranks, key=score)


def choose(route: Route | None, loads: dict[int, int | None], queue_threshold: int) -> list[list[int]]:
    """Ranks to try, best first, as tiers (the router takes the least loaded replica of the first tier that
    has room). loads: rank -> requests in flight there (None: not known yet).

    A keyed request goes to its replica unless that replica has `queue_threshold` or more requests in flight
    and another has fewer: then to the least loaded. A request asking for a rank that is gone (restarting)
    goes to any replica: its answer names the replica that gave it."""
    ranks = sorted(loads)
    if route is not None and route.rank is not None:
        return [[route.rank]] if route.rank in loads else [ranks]
    if route is None or route.key is None:
        return [ranks]
    preferred = rendezvous(route.key, ranks)
    load = loads[preferred]
    if load is not None and load >= queue_threshold and any(v is not None and v < load for v in loads.values()):
        return [ranks]
    return [[preferred], [r for r in ranks if r != preferred]]
