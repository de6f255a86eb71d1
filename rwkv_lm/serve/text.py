"""Token ids in, text out, for a stream: whole UTF-8 characters only, and nothing of a stop string."""
from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Token ids in, text out: whole UTF-8 characters only, and nothing of a stop string.

    Text that might be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.stop_hit: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.stop_hit is not None

    def push(self, token_id: int) -> str:
        """The text that is safe to show after one more token ('' while a character or stop string is open)."""
        self.held += self.utf8.decode(self.tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is still held once generation has ended."""
        self.held += self.utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [(i, s) for i, s in ((self.held.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            end, self.stop_hit = min(hits)
            out, self.held = self.held[:end], ""
            return out
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out
