"""The prefix state cache: the model state after a token prefix, kept so that a request starting with that
prefix reads only the tokens after it.

An RWKV state is a few fixed-size tensors whatever the prefix length, so one entry costs the same for 10
tokens or 10,000 (a transformer's KV cache grows with the prefix; it is cached the same way). Entries live in
RAM, least recently used first out, within a byte budget. Keys are the exact token prefix: a lookup matches
whole tokens only, so two prompts that share a beginning share only the state of that beginning; and keys
hold the state a prompt started from (`origin`: "" for the model's zero state, else `state_key(state)`, a digest
of it), so prompts from two starting states never share an entry.

States are not stored everywhere: the engine offers the state at prefill-chunk boundaries, at the end of
every request, and where a new prompt leaves a prompt seen before (`branch_point`), which is where the next
prompt with the same beginning (a shared system prompt, a conversation re-sent with one more message) needs
it. Finding those points costs a hash per `BRANCH_STRIDE` tokens.
"""
from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .memory import FreedMemory

import torch

BRANCH_STRIDE = 16  # a branch point is found to within this many tokens
SEEN_LIMIT = 100_000  # prefixes remembered for branch points (1.6M tokens of prompts; 14 MB)
KEY_BYTES = array("i").itemsize  # an entry's key holds its prefix at this many bytes a token
_MOD, _BASE = (1 << 61) - 1, 1_000_003


def prefix_hashes(tokens: Sequence[int], origin: str = "") -> list[int]:
    """h[n]: a rolling hash of tokens[:n] read from the starting state named `origin`, for n = 0 .. len(tokens)."""
    h = [0] * (len(tokens) + 1)
    for ch in origin:
        h[0] = (h[0] * _BASE + ord(ch) + 1) % _MOD
    for i, t in enumerate(tokens):
        h[i + 1] = (h[i] * _BASE + t + 1) % _MOD
    return h


def state_key(state) -> str:
    """The cache's name for a starting state (`Request.state_key`): a digest of its tensors, so equal states share
    entries and two different states never do, however each was loaded or named."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.tensors().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {data.dtype} {tuple(tensor.shape)};".encode())
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


@dataclass
class Entry:
    origin: str  # the starting state's `state_key` ("" for zeros)
    tokens: array  # the prefix, 4 bytes a token ("i"): counted in nbytes, as a long prompt's entries add up
    state: object  # a batch-1 state with its own storage
    logits: object | None  # [1, V] after the last token, when known: then a prompt equal to the key reads nothing
    nbytes: int


class StateCache:
    """LRU map from token prefixes to model states, at most `max_bytes` of entries (their tensors and token
    keys). Thread-safe."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the state cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, int], Entry] = OrderedDict()  # (length, hash) -> entry
        self._lengths: dict[int, int] = {}  # prefix length -> number of entries of that length
        self._seen: OrderedDict[int, None] = OrderedDict()  # length << 61 | hash, of prefixes read before
        self._lock = threading.Lock()
        self.hits = self.misses = self.bytes = 0
        self._freed = FreedMemory()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int], hashes: list[int] | None = None, origin: str = "") -> Entry | None:
        """The entry for the longest cached prefix of `tokens` (read from `origin`) that leaves something to
        compute: shorter than `tokens`, or all of them where the entry has the logits after them. None (a miss)
        if there is none."""
        hashes = hashes or prefix_hashes(tokens, origin)
        with self._lock:
            for n in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
                entry = self._entries.get((n, hashes[n]))
                if (entry is None or entry.origin != origin or entry.tokens != array("i", tokens[:n])
                        or (n == len(tokens) and entry.logits is None)):
                    continue
                self._entries.move_to_end((n, hashes[n]))
                self.hits += 1
                return entry
            self.misses += 1
            return None

    def insert(self, tokens: Sequence[int], state, logits=None, hashes: list[int] | None = None, origin: str = "") -> bool:
        """Keep a copy of `state` (batch 1) as the state after `tokens` read from `origin`, and the logits after
        them if given; False if it does not fit the budget."""
        n = len(tokens)
        if n == 0:
            return False
        key = (n, (hashes or prefix_hashes(tokens, origin))[n])
        nbytes = state.nbytes + (0 if logits is None else logits.numel() * logits.element_size()) + KEY_BYTES * n
        with self._lock:
            old = self._entries.get(key)
            if old is not None and (old.logits is not None or logits is None):
                self._entries.move_to_end(key)
                return True
            if nbytes > self.max_bytes:
                return False
            if old is not None:
                self._remove(key)
            # a copy: the state's tensors may be views into a whole chunk's activations
            self._entries[key] = Entry(origin, array("i", tokens), state.clone(), logits, nbytes)
            self._lengths[n] = self._lengths.get(n, 0) + 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
        return True

    def branch_point(self, hashes: list[int], start: int) -> int | None:
        """Remember the prefixes of a prompt (hashes from `prefix_hashes`) at every BRANCH_STRIDE tokens, and
        return the end of the longest one read before, if it lies beyond `start` (where reading begins)."""
        found = None
        with self._lock:
            for n in range(BRANCH_STRIDE, len(hashes) - 1, BRANCH_STRIDE):
                key = n << 61 | hashes[n]  # one int, not a tuple of two: half the memory at SEEN_LIMIT
                if key in self._seen:
                    self._seen.move_to_end(key)
                    found = n
                else:
                    self._seen[key] = None
            while len(self._seen) > SEEN_LIMIT:
                self._seen.popitem(last=False)
        return found if found is not None and found > start else None

    def _remove(self, key) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        self._freed.freed(entry.nbytes)
        n = len(entry.tokens)
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}
