"""Token ids in, text out, for a stream: whole UTF-8 characters only, and nothing of a stop string."""
from __future__ import annotations

import codecs
from collections.abc import Sequence

from .stops import StopMatcher


class TextStream:
    """Token ids in, text out: whole UTF-8 characters only, and nothing of a stop string.

    Text that might be the start of a stop string is held back until it is known not to be one; each token
    costs O(its text x stops), never the length of the stops (`StopMatcher`).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher(self.stop)
        self.held = ""
        self.stop_hit: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.stop_hit is not None

    def push(self, token_id: int) -> str:
        """The text that is safe to show after one more token ('' while a character or stop string is open)."""
        return self._release(self.utf8.decode(self.tokenizer.token_bytes(token_id)), final=False)

    def finish(self) -> str:
        """Whatever is still held once generation has ended."""
        return self._release(self.utf8.decode(b"", final=True), final=True)

    def _release(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.held + new
        hit = self.matcher.feed(new)
        if hit is not None:
            begin, self.stop_hit = hit
            cut, self.held = len(self.held) + begin, ""  # begin < 0: the stop began in the text held back
            return text[:cut]
        keep = 0 if final else self.matcher.pending
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]
