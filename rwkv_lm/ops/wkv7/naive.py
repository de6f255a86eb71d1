"""The WKV-7 recurrence, one step at a time: the ground truth every faster path is tested against.

Per head, with the state S [N_value, N_key] kept in fp32 (fp64 when the inputs are fp64):

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    o_t = S_t r_t

RWKV-7 calls it with a = -kk and b = kk * iclr, which makes the middle term a delta-rule update.
"""
from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence runs in: fp32, or fp64 when the inputs are fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wkv7_step(S, r, log_w, k, v, a, b):
    """One token for a batch of states: S [B, H, N, N]; r, log_w, k, v, a, b [B, H, N] -> (o [B, H, N], S).

    o comes in r's dtype, S in its own (fp32, or fp64 for gradcheck).
    """
    dt, out_dtype = S.dtype, r.dtype
    r, log_w, k, v, a, b = (x.to(dt) for x in (r, log_w, k, v, a, b))
    # products with vectors as broadcasts and sums: on a CPU, batched matmuls this small cost far more
    sa = (S * a.unsqueeze(-2)).sum(-1, keepdim=True)  # [B, H, N, 1]
    S = S * log_w.exp().unsqueeze(-2) + sa * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    return (S * r.unsqueeze(-2)).sum(-1).to(out_dtype), S


def wkv7_naive(r, log_w, k, v, a, b, initial_state=None):
    """r, log_w, k, v, a, b [B, T, H, N]; initial_state [B, H, N, N] or None.

    Returns (o [B, T, H, N] in the input dtype, final state [B, H, N, N] in fp32).
    """
    B, T, H, N = r.shape
    dt = state_dtype(r.dtype)
    S = r.new_zeros(B, H, N, N, dtype=dt) if initial_state is None else initial_state.to(dt)
    outputs = []
    for t in range(T):
        o, S = wkv7_step(S, r[:, t], log_w[:, t], k[:, t], v[:, t], a[:, t], b[:, t])
        outputs.append(o)
    o = torch.stack(outputs, dim=1) if outputs else r.new_zeros(B, 0, H, N)
    return o, S
