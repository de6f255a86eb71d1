"""Log-probabilities reported back to callers: the model's own distribution (log_softmax of its logits over the
ids the tokenizer can spell), before any penalty, bias, temperature or grammar edits what is drawn from. That is
what evaluation harnesses score."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .request import TokenLogprob


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int | None],
                   spellable: int | None = None) -> list[TokenLogprob | None]:
    """logits [B, V] that produced `tokens` [B] -> one TokenLogprob per row with its `tops[i]` most likely
    alternatives (None where tops[i] is None: that row records nothing). Ids from `spellable` on (the model has
    them, the tokenizer cannot spell them: never drawn) are left out of the distribution."""
    wanted = [i for i, k in enumerate(tops) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(tops)
    if not wanted:
        return out
    rows = logits[wanted].float()  # (a copy: indexed by a list)
    if spellable is not None:
        rows[:, spellable:] = float("-inf")
    rows = rows.log_softmax(-1)
    chosen = rows.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=rows.device)).squeeze(1).tolist()
    k = max(tops[i] for i in wanted)
    values, ids = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    for j, i in enumerate(wanted):
        out[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(ids[j][:tops[i]], values[j][:tops[i]])))
    return out


def prompt_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int, spellable: int | None = None) -> list[TokenLogprob]:
    """logits [T, V], row t the model's prediction for tokens[t] -> a TokenLogprob per token (`spellable`: as
    token_logprobs)."""
    return token_logprobs(logits, tokens, [top] * len(tokens), spellable)
