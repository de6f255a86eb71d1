"""Stop strings in text that arrives in pieces: each piece costs O(its length x number of stops), whatever the
length of the stops, and the text held back (a possible start of a stop) is shorter than the longest stop.

One Knuth-Morris-Pratt automaton per stop string: its state is the length of the longest end of the text so
far that begins the stop. The text ends before the stop string that is completed first (of two completed by
the same character, the longer), so the result does not depend on how the text was cut into pieces.
"""
from __future__ import annotations

from collections.abc import Sequence


def _failure(stop: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of stop[:i + 1] that is also its suffix."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Feed text in pieces; `feed` says where the first stop string ends it, if one does."""

    def __init__(self, stops: Sequence[str]):
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop strings must be non-empty str")
        self.stops = tuple(stops)
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)

    @property
    def pending(self) -> int:
        """How many characters at the end of the text fed so far may begin a stop string (hold them back)."""
        return max(self._state, default=0)

    def feed(self, text: str) -> tuple[int, str] | None:
        """(where in `text` the stop begins, the stop) once one is complete (its begin may be < 0: it began in
        an earlier piece), else None."""
        stops, fails, state = self.stops, self._fail, self._state
        for at, ch in enumerate(text):
            hit = None
            for i, stop in enumerate(stops):
                k = state[i]
                while k and stop[k] != ch:
                    k = fails[i][k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    if hit is None or len(stop) > len(hit):
                        hit = stop
                    k = fails[i][k - 1]
                state[i] = k
            if hit is not None:
                return at + 1 - len(hit), hit
        return None
