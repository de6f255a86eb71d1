"""Choosing the next token: a pure function of the logits and the settings (names as in vLLM / OpenAI)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 keeps every token)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 keeps every token)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1] (0 keeps every token)"),
            (0 < self.penalty_decay <= 1, "penalty_decay must be in (0, 1] (1: occurrences never fade)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must hold non-empty strings"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

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


def sample(logits: torch.Tensor, params: SamplingParams, *, counts: torch.Tensor | None = None,
           banned: tuple[int, ...] = (), generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V]; counts [B, V] (decayed occurrences, for the penalties) -> next tokens [B] (int64)."""
    logits = logits.float()
    if counts is not None and params.penalized:
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    if banned:
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
    if params.greedy:
        return logits.argmax(-1)

    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop a token when the tokens more likely than it already reach top_p
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def update_counts(counts: torch.Tensor | None, tokens: torch.Tensor, params: SamplingParams, vocab_size: int) -> torch.Tensor | None:
    """Decay the occurrence counts [B, V] and add the tokens [B] just generated (None when no penalty is set)."""
    if not params.penalized:
        return None
    if counts is None:
        counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    counts = counts * params.penalty_decay
    return counts.index_put((torch.arange(tokens.shape[0], device=tokens.device), tokens),
                            torch.ones_like(tokens, dtype=counts.dtype), accumulate=True)


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """A seeded random generator for `params.seed`, or None (torch's global one)."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)
