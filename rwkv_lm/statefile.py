"""Tuned-state files: each layer's initial WKV state, the result of state tuning (`model.tune: state`).

Two containers, the same tensors: `blocks.{i}.att.time_state`, [H, N, N] fp32, value x key (the
orientation of our WKV op's state and of the official x070 runtime's, which uses the matrix as it is).

- `.pth`: the official layout (RWKV-PEFT, RWKV-Runner, Ai00); a plain state dict, shapes only.
- anything else: safetensors with the model config in its metadata, so a state made for another model
  says which one.

`load_state(path, model)` gives an `RWKVState` of one row: the file's WKV matrices, token shifts at zero.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import CheckpointError, atomic_write, file_kind, read_pth, read_tagged
from .state import RWKVState

FORMAT = "rwkv_lm.state"


def key(layer: int) -> str:
    return f"blocks.{layer}.att.time_state"


def save_state(wkv: list[torch.Tensor], path, *, config: dict | None = None) -> Path:
    """Write per-layer WKV states ([H, N, N] each, or [1, H, N, N]) as a state file; `.pth`: the official
    layout, otherwise ours (safetensors, `config` (the model's `config.to_dict()`) in its metadata)."""
    tensors = {key(i): s.detach().reshape(s.shape[-3:]).to("cpu", torch.float32).contiguous() for i, s in enumerate(wkv)}
    if str(path).endswith(".pth"):
        return atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    meta = {"format": FORMAT, "config": json.dumps(config or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_state(path) -> tuple[list[torch.Tensor], dict]:
    """(per-layer WKV states [H, N, N] fp32, the model config the file names or {}) of either container."""
    path = Path(path)
    if file_kind(path) == "pth":
        sd, config = read_pth(path), {}
    else:
        sd, meta = read_tagged(path, FORMAT, f"a state file (no format {FORMAT!r} in its metadata); write one with "
                                             "`python -m train export` from a state-tuned run or rwkv_lm.save_state")
        config = json.loads(meta.get("config") or "{}")
    n_layer = sum(1 for k in sd if k.endswith(".att.time_state"))
    if n_layer == 0 or set(sd) != {key(i) for i in range(n_layer)}:
        extra = sorted(set(sd) - {key(i) for i in range(n_layer)})
        raise CheckpointError(f"{path}: not a state file: expected tensors blocks.0..{max(n_layer - 1, 0)}.att.time_state"
                              + (f", found {extra[0]!r}" if extra else "") + " (a model checkpoint is loaded with rwkv_lm.load)")
    wkv = [sd[key(i)] for i in range(n_layer)]
    for i, s in enumerate(wkv):
        if s.dim() != 3 or s.shape[1] != s.shape[2] or s.shape != wkv[0].shape or not s.is_floating_point():
            raise CheckpointError(f"{path}: {key(i)} has shape {tuple(s.shape)} ({s.dtype}); every layer's state must be "
                                  f"[H, N, N] floating point, as layer 0's {tuple(wkv[0].shape)}")
    return [s.float() for s in wkv], config


def load_state(path, model=None) -> RWKVState:
    """A tuned state as the starting state of one sequence (token shifts zero).

    With `model`: checked against its shape (a clear error otherwise) and put on its device and dtype.
    """
    wkv, config = read_state(path)
    H, N = wkv[0].shape[:2]
    if model is None:
        return RWKVState.zeros(len(wkv), 1, H * N, H, N).with_wkv(wkv)
    empty = model.init_state(1)
    if not isinstance(empty, RWKVState):
        raise CheckpointError(f"{path}: a WKV state file is for RWKV-7 models, not {type(model).__name__}")
    cfg = model.config
    if (len(wkv), H, N) != (cfg.n_layer, cfg.n_head, cfg.head_size):
        made = (f"n_layer={config['n_layer']}, n_embd={config['n_embd']}, head_size={config['head_size']}"
                if {"n_layer", "n_embd", "head_size"} <= set(config) else f"{len(wkv)} layers of {H} heads of size {N}")
        raise CheckpointError(f"{path}: the state was made for another model shape ({made}); this model has "
                              f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, head_size={cfg.head_size}")
    return empty.with_wkv(wkv)
