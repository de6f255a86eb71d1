"""Random models and WKV-7 inputs, and the error measure, for checking a fast path against its reference
(the tests and the bench scripts use these)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .model import DECAY_SCALE, RWKV, RWKVConfig


def random_inputs(B, T, H, N, *, dtype=torch.float32, device="cpu", seed=None):
    """r, log_w, k, v, a, b [B, T, H, N] as the model makes them (a = -kk, b = kk * iclr with a unit-norm kk,
    decays in the model's range) and an initial state [B, H, N, N] fp32. seed=None draws a fresh one."""
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    g = torch.Generator().manual_seed(seed)  # on the CPU, so a seed gives the same inputs on every device
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    log_w = -DECAY_SCALE * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    xs = [rnd(B, T, H, N), log_w, rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * iclr]
    return [x.to(device=device, dtype=dtype) for x in xs], rnd(B, H, N, N).to(device=device, dtype=torch.float32)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, in fp64; NaN when `actual` is not finite, so it fails any `<` test."""
    if actual.shape != expected.shape:
        raise ValueError(f"rel_err: shapes differ, {tuple(actual.shape)} vs {tuple(expected.shape)}")
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    if not torch.isfinite(actual).all():
        return float("nan")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def random_model(cfg: RWKVConfig, seed: int = 0, dtype=torch.float32) -> RWKV:
    """A model whose every weight is random (the official init leaves many at zero, which would hide bugs).
    Seeds torch's global generator with `seed`."""
    torch.manual_seed(seed)
    model = RWKV(cfg).reset_parameters()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.dim() == 2 else 0.2))
    return model.to(dtype).eval()
