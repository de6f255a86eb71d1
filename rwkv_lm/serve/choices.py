"""Logprobs in OpenAI's shapes: tokens as text (a token that is not whole UTF-8 is written "bytes:\\xNN..."),
the completions API's parallel lists with text offsets, the chat API's list of entries with bytes."""
from __future__ import annotations

import codecs

from .request import TokenLogprob


def token_text(tokenizer, token: int) -> str:
    data = tokenizer.token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class LogprobWriter:
    """One choice's logprobs, written piece by piece (text offsets carry on from piece to piece)."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def completion(self, entries: list[TokenLogprob | None], tokens: list[int]) -> dict:
        """The completions API's {"tokens", "token_logprobs", "top_logprobs", "text_offset"} for `tokens`
        (`entries`: their logprobs, None for a prompt's first token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries):
            out["tokens"].append(token_text(self.tokenizer, token))
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            out["top_logprobs"].append(None if entry is None else
                                       {token_text(self.tokenizer, t): lp for t, lp in entry.top})
            out["text_offset"].append(self.offset)
            self.offset += len(self._utf8.decode(self.tokenizer.token_bytes(token)))
        return out

    def chat(self, entries: list[TokenLogprob]) -> list[dict]:
        """The chat API's logprobs.content entries."""
        def one(token: int, logprob: float) -> dict:
            return {"token": token_text(self.tokenizer, token), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token))}
        return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
