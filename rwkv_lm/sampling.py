"""Choosing the next token: a pure function of the logits and each row's settings (names as in vLLM / OpenAI).

Rows of one batch may each have their own settings: `sample` takes one `RowSampler` per row, which holds the
row's `SamplingParams`, its random generator (seeded rows draw from their own, so a seed gives the same text
whatever else shares the batch) and its penalty counts.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .ops.cpu_kernels import kernels


class SamplingError(ValueError):
    """A sampling setting out of range: `param` names it, `reason` says what it must be."""

    def __init__(self, param: str, reason: str, params):
        super().__init__(f"{reason}; got {params}")
        self.param, self.reason, self.params = param, reason, params

    def __reduce__(self):  # (pickle, copy): rebuilt from what __init__ takes
        return type(self), (self.param, self.reason, self.params)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # keep the most likely tokens whose probabilities add up to top_p
    top_k: int = 0  # keep the k most likely tokens; 0: all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per (decayed) occurrence
    penalty_decay: float = 1.0  # occurrences are multiplied by this after every token (RWKV's chat uses 0.996)
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings, which is not returned
    seed: int | None = None  # same seed, same settings, same model -> same text
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); a dict is taken too

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or ())
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 means greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 keeps every token)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0 (0 keeps every token)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1] (0 keeps every token)"),
            ("presence_penalty", math.isfinite(self.presence_penalty), "must be a finite number"),
            ("frequency_penalty", math.isfinite(self.frequency_penalty), "must be a finite number"),
            ("penalty_decay", 0 < self.penalty_decay <= 1, "must be in (0, 1] (1: occurrences never fade)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must hold non-empty strings"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64),
             "must be None or an integer in [-2**63, 2**64) (what a torch.Generator takes)"),
            ("logit_bias", all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
             "must map token ids >= 0 to biases in [-100, 100]"),
        ]
        for param, ok, rule in checks:
            if not ok:
                raise SamplingError(param, f"{param} {rule}", self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def replace(self, **overrides) -> "SamplingParams":
        """A copy with some settings changed; an unknown name is a ValueError that lists the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)


def resolve(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """`params` (defaults when None) with keyword overrides applied."""
    if params is not None and not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    return (params or SamplingParams()).replace(**overrides)


class RowSampler:
    """What decides one row's next tokens: its settings, its generator, tokens it may not draw, and (when a
    penalty is set) the decayed count of every token it has generated so far."""

    def __init__(self, params: SamplingParams, *, banned: Sequence[int] = (), device="cpu"):
        self.params, self.banned, self.device = params, frozenset(banned), torch.device(device)
        if any(i < 0 for i in self.banned):
            raise ValueError(f"banned token ids must be >= 0, got {min(self.banned)}")
        self.banned_ids = torch.tensor(sorted(self.banned), dtype=torch.long, device=device)  # (made once, used every step)
        self.generator = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
        self.counts: torch.Tensor | None = None  # [V], created at the first token

    def observe(self, token: int, vocab_size: int) -> None:
        """Count a token just generated (for the penalties; nothing to do without one)."""
        if not self.params.penalized:
            return
        if self.counts is None:
            self.counts = torch.zeros(vocab_size, device=self.device)
        self.counts.mul_(self.params.penalty_decay)[token] += 1


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension (the first of equal maxima; a NaN wins). fp32 on the CPU through numpy's, on
    the caller's thread alone: in a serving engine's thread torch's parallel ops first wake their workers, which
    then contend with the kernels' spinning ones (16 rows of 65,536: 0.60 ms against torch's max() 1.19 and argmax()
    0.89 in such a thread; py-spy put 5% of a 16-stream fp32 engine there); other devices and dtypes through torch's."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(np.argmax(logits.numpy(), -1))
    return logits.argmax(-1)


def sample(logits: torch.Tensor, rows: Sequence[RowSampler], allowed: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V], one RowSampler per row -> next tokens [B] (int64), each row by its own settings;
    `allowed`: a bitmask [B, ceil(V / 32)] int32 of the tokens each row may draw (a grammar's), or None for all."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(rows)} samplers")
    if allowed is None and all(row.params.greedy and row.counts is None and not row.params.logit_bias for row in rows):
        # greedy rows whose only edit is their banned ids (a tokenizer's unspellable ones: every World request's):
        # the raw argmax is the masked one unless it is banned, so the copy and the fill (~1.8 ms of a 16-row step
        # of 65,536 logits in a serving engine) run only for such rows
        tokens = greedy_tokens(logits)
        if not any(t in row.banned for t, row in zip(tokens.tolist(), rows)):
            return tokens
    edited = allowed is not None or any(row.counts is not None or row.banned or row.params.logit_bias for row in rows)
    logits = logits.float().clone() if edited else logits.float()  # never edit the caller's logits
    if allowed is not None:
        forbid(logits, allowed)
    for i, row in enumerate(rows):  # per-row edits, rare and cheap
        if row.counts is not None:
            p = row.params
            logits[i] -= p.presence_penalty * (row.counts > 0) + p.frequency_penalty * row.counts
        if row.params.logit_bias:
            ids, biases = zip(*row.params.logit_bias)
            logits[i, list(ids)] += torch.tensor(biases, device=logits.device)
    # the rows that ban the same tokens (a tokenizer's unspellable ids: usually all) at once, not one indexing a row
    # (a row each: 9% of the GIL-held samples of a 16-stream server)
    by_banned: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        if row.banned:
            by_banned.setdefault(row.banned, []).append(i)
    for at in by_banned.values():
        ids = rows[at[0]].banned_ids
        if len(at) == len(rows):
            logits.index_fill_(1, ids, float("-inf"))
        else:
            logits[torch.tensor(at, device=logits.device)[:, None], ids] = float("-inf")
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not drawn:
        return greedy_tokens(logits)
    if len(drawn) == len(rows):
        return _draw(logits, rows)
    tokens = greedy_tokens(logits)
    tokens[drawn] = _draw(logits[drawn], [rows[i] for i in drawn])
    return tokens


# bit j of each byte value: a bitmask unpacked a byte at a time through this table
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


def unpack_bitmask(allowed: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bitmask [B, W] int32 (bit i of word w: token 32 w + i) -> [B, vocab] bool."""
    assert sys.byteorder == "little", "bit i of word w (token 32 w + i) is read from byte 4 w + i // 8"
    as_bytes = allowed.contiguous().view(torch.uint8).flatten().int()
    return _BYTE_BITS.to(allowed.device).index_select(0, as_bytes).view(allowed.shape[0], -1)[:, :vocab]


def forbid(logits: torch.Tensor, allowed: torch.Tensor) -> None:
    """Set to -inf, in place, the logits [B, V] of the tokens the bitmask `allowed` [B, ceil(V / 32)] forbids.

    On the CPU a C loop that skips words of ones (a grammar's mask inside a string is nearly all ones): 16 rows
    of 65,536 take 0.3-0.5 ms on one thread where unpacking every bit in torch takes 2.1-2.8 ms; elsewhere, and
    where the kernels are not built, the unpacking is the reference."""
    kernel = kernels().get("mask_logits") if logits.device.type == "cpu" else None
    if kernel is None or logits.dtype != torch.float32 or not logits.is_contiguous():
        logits.masked_fill_(~unpack_bitmask(allowed, logits.shape[-1]), float("-inf"))
        return
    words = allowed.contiguous()
    if kernel(logits.data_ptr(), words.data_ptr(), logits.shape[0], logits.shape[1], words.shape[1]) != 0:
        raise ValueError(f"a bitmask of {words.shape[1]} words cannot cover {logits.shape[1]} logits")


TOP_P_CANDIDATES = (256, 4096)  # how many of the most likely tokens top_p looks among, in turn, before all


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor, candidates: tuple[int, ...] = TOP_P_CANDIDATES) -> torch.Tensor:
    """probs [B, V] with each row's tokens zeroed once the tokens more likely than them reach its top_p [B, 1].

    The cut nearly always falls among the few most likely tokens, so it is looked for among the first
    `candidates[0]` (a top-k), rows whose cut lies beyond them among the next number's, and only the rest sort
    all V: at V = 65,536 and 16 rows (one thread) the top 256 take 3 ms, the top 4096 12, a full sort 79.
    candidates=() is the plain full sort: the reference. (Tokens of exactly equal probability at the cut may be
    kept in another order than a full sort's, as a full sort's own order among ties is arbitrary.)"""
    V = probs.shape[-1]
    values, order = probs.topk(min(candidates[0], V), dim=-1) if candidates else probs.sort(-1, descending=True)
    keep = values.cumsum(-1) - values < top_p
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)
    filtered = probs.masked_fill(~mask, 0)
    beyond = keep[:, -1] & (values.shape[-1] < V)  # the last candidate still kept: the cut may lie further down
    if beyond.any():
        rows = beyond.nonzero().squeeze(1)
        filtered[rows] = top_p_filter(probs[rows], top_p[rows], candidates[1:])
    return filtered


def _draw(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Random draws for rows with temperature > 0: temperature, top_k, top_p, min_p, then the inverse CDF at
    one uniform number per row from the row's own generator."""
    params = [row.params for row in rows]
    device = logits.device
    column = lambda values: torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # noqa: E731
    logits = logits / column([p.temperature for p in params])
    V = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    if min(top_k) < V:
        kth = logits.topk(max(top_k), dim=-1).values.gather(1, torch.tensor(top_k, device=device).unsqueeze(1) - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    top_p = column([p.top_p for p in params])
    if (top_p < 1).any():
        probs = top_p_filter(probs, top_p)
    min_p = column([p.min_p for p in params])
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0)
    uniform = torch.cat([torch.rand(1, generator=row.generator, device=row.device) for row in rows]).to(device).unsqueeze(1)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=V - 1)
    # a draw that lands on a run of zero-probability tokens at the very top takes the last kept token instead
    kept = probs.gather(1, picked) > 0
    if bool(kept.all()):
        return picked.squeeze(1)
    last_kept = V - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
    return torch.where(kept, picked, last_kept).squeeze(1)
