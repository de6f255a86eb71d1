"""WKV-7 in chunks, in pure torch: the same recurrence as `naive.py`, fast on a CPU and differentiable.

Within a chunk of L tokens starting from state S0, write G_t = prod_{u<=t} w_u (per key channel). Then

    S_t  = S0 diag(G_t) + sum_{s<=t} (sa_s b_s^T + v_s k_s^T) diag(G_t / G_s),   sa_t = S_{t-1} a_t

so every token's sa_t, output and the chunk's final state are linear in S0. The decay ratios G_t / G_s
are formed as exp(cumsum differences) over s <= t only, never as a quotient, so any decay is safe.
Everything that does not depend on S0 is computed for all chunks at once; the loop over chunks is
one [N, N] matmul per chunk (S_next = S0 A + K).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import state_dtype

CHUNK_SIZE = 16


def _to_chunks(x, L, dt):
    """[B, T, H, N] -> [B, H, NC, L, N], zero-padded at the end (a zero token leaves the state as it is)."""
    B, T, H, N = x.shape
    x = F.pad(x.to(dt), (0, 0, 0, 0, 0, (-T) % L))
    return x.view(B, -1, L, H, N).permute(0, 3, 1, 2, 4)


def _pair_decay(cum_t, cum_s, mask):
    """exp(cum_t[t] - cum_s[s]) where mask[t, s], else 0: [..., L, N] x [..., L, N] -> [..., L, L, N]."""
    diff = cum_t.unsqueeze(-2) - cum_s.unsqueeze(-3)
    return torch.exp(diff.masked_fill(~mask[..., None], float("-inf")))


def wkv7_chunked(r, log_w, k, v, a, b, initial_state=None, chunk_size=CHUNK_SIZE):
    """Same signature and result as `wkv7_naive`: inputs [B, T, H, N] -> (o [B, T, H, N], state [B, H, N, N])."""
    B, T, H, N = r.shape
    in_dtype, dt = r.dtype, state_dtype(r.dtype)
    L = chunk_size
    r, log_w, k, v, a, b = (_to_chunks(x, L, dt) for x in (r, log_w, k, v, a, b))
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(dt)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=in_dtype), S

    cum = log_w.cumsum(-2)  # log G_t, inclusive
    cum_before = cum - log_w  # log G_{t-1}
    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    upto = torch.tril(ones)  # s <= t
    before = torch.tril(ones, -1)  # s < t
    decay_before = _pair_decay(cum_before, cum, before)  # G_{t-1} / G_s
    decay_upto = _pair_decay(cum, cum, upto)  # G_t / G_s

    def pair(x, decay, y):  # sum_j x_t[j] decay[t, s, j] y_s[j] -> [..., L, L]
        return torch.einsum("...tj,...tsj,...sj->...ts", x, decay, y)

    # sa (rows sa_t) solves (I - M_ab) sa = (a * G_{t-1}) S0^T + M_ak v; both right-hand sides at once.
    eye = torch.eye(L, dtype=dt, device=r.device)
    lhs = eye - pair(a, decay_before, b)
    rhs = torch.cat([a * cum_before.exp(), pair(a, decay_before, k) @ v], dim=-1)
    sol = torch.linalg.solve_triangular(lhs, rhs, upper=False, unitriangular=True)
    sa_from_state, sa_rest = sol[..., :N], sol[..., N:]  # sa = sa_from_state @ S0^T + sa_rest

    m_rb = pair(r, decay_upto, b)
    out_from_state = r * cum.exp() + m_rb @ sa_from_state  # o = out_from_state @ S0^T + out_rest
    out_rest = m_rb @ sa_rest + pair(r, decay_upto, k) @ v

    to_end = (cum[..., -1:, :] - cum).exp()  # G_L / G_s
    b_to_end, k_to_end = b * to_end, k * to_end
    # S_next = S0 @ transition + injected
    transition = torch.diag_embed(cum[..., -1, :].exp()) + sa_from_state.transpose(-1, -2) @ b_to_end
    injected = sa_rest.transpose(-1, -2) @ b_to_end + v.transpose(-1, -2) @ k_to_end

    chunk_states = []
    for c in range(r.shape[2]):
        chunk_states.append(S)
        S = S @ transition[:, :, c] + injected[:, :, c]
    starts = torch.stack(chunk_states, dim=2)  # [B, H, NC, N, N]
    o = out_from_state @ starts.transpose(-1, -2) + out_rest  # [B, H, NC, L, N]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, -1, H, N)[:, :T]
    return o.to(in_dtype), S
