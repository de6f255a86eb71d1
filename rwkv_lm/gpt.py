"""A GPT baseline with the RWKV model's interface, so the trainer, runtime and demo drive both alike.

Pre-LayerNorm blocks, rotary positions, `F.scaled_dot_product_attention`, and a KV cache as the "state":
`model(tokens, state)` appends to the cache (a prompt can be fed in pieces), `model.step(token, state)`
decodes one token. Unlike RWKV's state, the cache grows with the context: that is the point of comparing.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import RWKV, parameter_count
from .state import ModelState


@dataclass
class GPTConfig:
    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    dim_ffn: int = 0  # 0: 4 * n_embd
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size (rotary pairs)")
        self.dim_ffn = self.dim_ffn or 4 * self.n_embd

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return {"arch": "gpt", **asdict(self)}


@dataclass
class GPTState(ModelState):
    """The KV cache of a batch: keys (already rotated) and values per layer, left-padded to a common length.

    k[i], v[i]: [B, H, S, D]; pos: [B] int64, how many tokens each row has seen (its last pos[b] slots
    are real, the rest padding). Methods return new objects; nothing is changed in place.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: torch.Tensor

    def map(self, fn) -> "GPTState":
        return GPTState([fn(t) for t in self.k], [fn(t) for t in self.v], fn(self.pos))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor, as written to a state file."""
        return {"pos": self.pos, **{f"layers.{i}.{kv}": t for kv in ("k", "v") for i, t in enumerate(getattr(self, kv))}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "GPTState":
        n_layer = sum(name.endswith(".k") for name in tensors)
        return cls(*([tensors[f"layers.{i}.{kv}"] for i in range(n_layer)] for kv in ("k", "v")), tensors["pos"])

    @classmethod
    def empty(cls, batch_size: int, n_layer: int, n_kv_head: int, head_size: int, like: torch.Tensor) -> "GPTState":
        """The cache of a batch that has seen nothing, in `like`'s dtype and device."""
        keys = [like.new_zeros(batch_size, n_kv_head, 0, head_size) for _ in range(n_layer)]
        return cls(keys, list(keys), torch.zeros(batch_size, dtype=torch.long, device=like.device))

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def row_nbytes(self) -> list[int]:
        """Each row's own keys and values (its real slots, not the padding), plus its position."""
        per_slot = sum(t.shape[1] * t.shape[3] * t.element_size() for t in (*self.k, *self.v))
        return [int(n) * per_slot + self.pos.element_size() for n in self.pos.tolist()]

    def select(self, rows) -> "GPTState":
        """The caches of some batch rows (a list, slice or index tensor), without padding they no longer need."""
        pos = self.pos[rows].reshape(-1)
        keep = int(pos.max()) if pos.numel() else 0
        return GPTState([t[rows][:, :, t.shape[2] - keep:] for t in self.k], [t[rows][:, :, t.shape[2] - keep:] for t in self.v], pos)

    @classmethod
    def cat(cls, states: list["GPTState"]) -> "GPTState":
        """Stack several caches along the batch dimension, left-padding the shorter ones."""
        S = max(s.k[0].shape[2] for s in states)

        def stack(tensors):
            return torch.cat([F.pad(t, (0, 0, S - t.shape[2], 0)) for t in tensors])

        n_layer = len(states[0].k)
        return cls([stack([s.k[i] for s in states]) for i in range(n_layer)],
                   [stack([s.v[i] for s in states]) for i in range(n_layer)],
                   torch.cat([s.pos for s in states]))


def rotate(x, pos, base):
    """Rotary position embedding. x [B, H, T, D]; pos [B, T] absolute positions."""
    D = x.shape[-1]
    freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = pos[:, None, :, None].float() * freq  # [B, 1, T, D/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.rope_base = cfg.n_head, cfg.rope_base
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, pos, cache_k, cache_v, mask):
        """x [B, T, C]; pos [B, T]; cache [B, H, S, D]; mask None (plain causal) or [B, 1, T, S + T] bool."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, pos, self.rope_base), rotate(k, pos, self.rope_base)
        k, v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.proj = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, cache_k, cache_v, mask):
        h, k, v = self.attn(self.ln1(x), pos, cache_k, cache_v, mask)
        x = x + h
        return x + self.mlp(self.ln2(x)), k, v


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def init_state(self, batch_size: int = 1) -> GPTState:
        cfg = self.config
        return GPTState.empty(batch_size, cfg.n_layer, cfg.n_head, cfg.head_size, self.wte.weight)

    def forward(self, tokens: torch.Tensor, state: GPTState | None = None, *, last_only: bool = False):
        """tokens [B, T] -> (logits [B, T, V] (or [B, 1, V] with last_only), the cache with these tokens added)."""
        B, T = self.check_tokens(tokens, 2)
        state = self.check_state(state, B)
        S = state.k[0].shape[2]
        pos = state.pos[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
        mask = None  # a fresh sequence needs only the causal mask SDPA builds itself
        if S > 0:
            # query t sits at cache column S + t; row b's real keys start at column S - pos[b]
            col = torch.arange(S + T, device=tokens.device)
            causal = col[None, :] <= (S + torch.arange(T, device=tokens.device))[:, None]  # [T, S + T]
            real = col[None, :] >= (S - state.pos)[:, None]  # [B, S + T]
            mask = (causal[None] & real[:, None])[:, None]  # [B, 1, T, S + T]
        x = self.wte(tokens)
        ks, vs = [], []
        for block, cache_k, cache_v in zip(self.blocks, state.k, state.v):
            x, k, v = block(x, pos, cache_k, cache_v, mask)
            ks.append(k)
            vs.append(v)
        if last_only:
            x = x[:, -1:]
        return self.head(self.ln_f(x)), GPTState(ks, vs, state.pos + T)

    def step(self, tokens: torch.Tensor, state: GPTState | None = None):
        """One token per row. tokens [B] -> (logits [B, V], new state)."""
        self.check_tokens(tokens, 1, ids=False)  # (forward checks the ids)
        logits, state = self(tokens.unsqueeze(1), state)
        return logits[:, 0], state

    check_tokens = RWKV.check_tokens  # the same checks and messages as RWKV-7

    def check_state(self, state, batch_size):
        if state is None:
            return self.init_state(batch_size)
        cfg = self.config
        want = (batch_size, cfg.n_head, cfg.head_size)
        if not isinstance(state, GPTState) or len(state.k) != cfg.n_layer or \
                (state.k[0].shape[0], state.k[0].shape[1], state.k[0].shape[3]) != want:
            got = f"{len(state.k)} layers, k {tuple(state.k[0].shape)}" if isinstance(state, GPTState) else type(state).__name__
            raise ValueError(f"state does not fit this model: expected a GPTState of {cfg.n_layer} layers with k "
                             f"[{batch_size}, {cfg.n_head}, S, {cfg.head_size}], got {got}; "
                             "start from model.init_state(batch_size) or a state made by this model")
        return state

    def num_params(self, include_embedding: bool = True) -> int:
        n = parameter_count(self)
        return n if include_embedding else n - self.wte.weight.numel()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """GPT-2's initialization: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer), generator=generator)
            elif p.dim() == 2:
                p.normal_(0.0, 0.02, generator=generator)
        for norm in (m for m in self.modules() if isinstance(m, nn.LayerNorm)):
            norm.reset_parameters()
        return self
