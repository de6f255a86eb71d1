"""WKV-7 in chunks, in pure torch: the same recurrence as `naive.py`, fast on a CPU and differentiable.

Within a chunk of L tokens starting from state S0, write G_t = prod_{u<=t} w_u (per key channel). Then

    S_t  = S0 diag(G_t) + sum_{s<=t} (sa_s b_s^T + v_s k_s^T) diag(G_t / G_s),   sa_t = S_{t-1} a_t

so every token's sa_t, output and the chunk's final state are linear in S0. Everything that does not
depend on S0 is computed for all chunks at once; the loop over chunks is one [N, N] matmul per chunk
(S_next = S0 A + K).

The token-pair terms sum_j x_t[j] (G_t / G_s)[j] y_s[j] are small matmuls of (x_t G_t) and (y_s / G_s).
1 / G_s grows as exp(total decay of the chunk), which RWKV-7's decay keeps below e^10 for 16 tokens;
for stronger decays the ratios are formed as exp(cumsum differences) over s <= t only, never as a
quotient, which is exact for any decay but costs an [L, L, N] tensor per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import state_dtype

CHUNK_SIZE = 16
MAX_FACTORED_DECAY = 30.0  # e^30 leaves fp32 far from overflow in the factored pair products


def _to_chunks(x, L, dt):
    """[B, T, H, N] -> [B, H, NC, L, N], zero-padded at the end (a zero token leaves the state as it is)."""
    B, T, H, N = x.shape
    x = F.pad(x.to(dt), (0, 0, 0, 0, 0, (-T) % L))
    return x.view(B, -1, L, H, N).permute(0, 3, 1, 2, 4)


def _unit_lower_inverse(m):
    """(I - m)^-1 for strictly lower-triangular m [..., L, L].

    m is nilpotent, so the inverse is I + m + m^2 + ... = (I + m)(I + m^2)(I + m^4)...: a few batched
    matmuls, far cheaper on a CPU than a batched triangular solve of many tiny systems.
    """
    inv = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device) + m
    power, reach = m, 2
    while reach < m.shape[-1]:
        power = power @ power
        inv = inv + inv @ power
        reach *= 2
    return inv


def _pair_matrices(r, a, k, b, cum, cum_before):
    """M_ab, M_ak (s < t, decay G_{t-1} / G_s) and M_rb, M_rk (s <= t, decay G_t / G_s), each [..., L, L]."""
    L = r.shape[-2]
    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    upto, before = torch.tril(ones), torch.tril(ones, -1)
    if float((-cum[..., -1, :]).detach().max()) < MAX_FACTORED_DECAY:
        a_t, r_t = a * cum_before.exp(), r * cum.exp()
        inv = (-cum).exp()
        b_s, k_s = b * inv, k * inv

        def pair(x, y, mask):
            return (x @ y.transpose(-1, -2)).masked_fill(~mask, 0.0)

        return pair(a_t, b_s, before), pair(a_t, k_s, before), pair(r_t, b_s, upto), pair(r_t, k_s, upto)

    def decay(cum_t, mask):  # exp(cum_t[t] - cum[s]) where mask[t, s], else 0: [..., L, L, N]
        diff = cum_t.unsqueeze(-2) - cum.unsqueeze(-3)
        return torch.exp(diff.masked_fill(~mask[..., None], float("-inf")))

    def pair(x, d, y):
        return torch.einsum("...tj,...tsj,...sj->...ts", x, d, y)

    d_before, d_upto = decay(cum_before, before), decay(cum, upto)
    return pair(a, d_before, b), pair(a, d_before, k), pair(r, d_upto, b), pair(r, d_upto, k)


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
    m_ab, m_ak, m_rb, m_rk = _pair_matrices(r, a, k, b, cum, cum_before)

    # sa (rows sa_t) solves (I - M_ab) sa = (a * G_{t-1}) S0^T + M_ak v
    solve = _unit_lower_inverse(m_ab)
    sa_from_state = solve @ (a * cum_before.exp())  # sa = sa_from_state @ S0^T + sa_rest
    sa_rest = solve @ (m_ak @ v)

    out_from_state = r * cum.exp() + m_rb @ sa_from_state  # o = out_from_state @ S0^T + out_rest
    out_rest = m_rb @ sa_rest + m_rk @ v

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
