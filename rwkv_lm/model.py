"""RWKV-7 "Goose" (x070): the whole architecture, used as it is by the trainer and the runtime.

Read top to bottom: the config, the time mix (token shift, LoRA-made decay / in-context learning rate /
value residual / gate, then the WKV-7 recurrence), the channel mix, a block, the model. Parallel mode
(`model(tokens, state)`) and RNN mode (`model.step(token, state)`) run the same code: a block sees
[B, T, C]; with T == 1 the recurrence takes one step, otherwise it runs over the sequence in chunks.
Parameter names are the official checkpoint keys, so an official file loads by name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.wkv7 import wkv7, wkv7_one
from .state import LayerState, RWKVState

DECAY_SCALE = math.exp(-0.5)  # decay = exp(-e^-0.5 * sigmoid(.)) lies in (0.545, 1)


def _suggested_lora(n_embd: int, factor: float) -> int:
    # RWKV-LM's rule of thumb: factor * sqrt(C), rounded to a multiple of 32, at least 32.
    return max(32, int(round(factor * n_embd**0.5 / 32)) * 32)


def parameter_count(model: nn.Module) -> int:
    """The model's parameters as its architecture has them: a Linear's weight counts in x out however the CPU
    runtime stores it (fp32 in panels padded to whole ones, int4 two to a byte); a shared parameter counts once."""
    seen, total = set(), 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                linear_weight = isinstance(module, nn.Linear) and name == "weight"
                total += module.in_features * module.out_features if linear_weight else p.numel()
    return total


@dataclass
class RWKVConfig:
    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: int = 0  # 0: 4 * n_embd
    decay_lora: int = 0  # 0: the official suggestion for this width
    iclr_lora: int = 0
    value_lora: int = 0
    gate_lora: int = 0

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of head_size={self.head_size}")
        self.dim_ffn = self.dim_ffn or 4 * self.n_embd
        self.decay_lora = self.decay_lora or _suggested_lora(self.n_embd, 2.5)
        self.iclr_lora = self.iclr_lora or _suggested_lora(self.n_embd, 2.5)
        self.value_lora = self.value_lora or _suggested_lora(self.n_embd, 1.7)
        self.gate_lora = self.gate_lora or _suggested_lora(self.n_embd, 5.0)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return {"arch": "rwkv7", **asdict(self)}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "RWKVConfig":
        """Read every size from the tensors' shapes (official files carry no config)."""
        vocab_size, n_embd = sd["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        n_head, head_size = sd["blocks.0.att.r_k"].shape
        value_key = "blocks.1.att.v1" if n_layer > 1 else None
        return cls(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_embd=n_embd,
            head_size=head_size,
            dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
            decay_lora=sd["blocks.0.att.w1"].shape[1],
            iclr_lora=sd["blocks.0.att.a1"].shape[1],
            value_lora=sd[value_key].shape[1] if value_key in sd else 0,
            gate_lora=sd["blocks.0.att.g1"].shape[1],
        )


def _lora(n_in: int, rank: int, n_out: int):
    """A low-rank pair (down [C, rank], up [rank, C]), stored as the official files do."""
    return nn.Parameter(torch.zeros(n_in, rank)), nn.Parameter(torch.zeros(rank, n_out))


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        # token-shift interpolation weights, one per input of the mix
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.w0 = nn.Parameter(torch.zeros(1, 1, C))  # decay
        self.w1, self.w2 = _lora(C, cfg.decay_lora, C)
        self.a0 = nn.Parameter(torch.zeros(1, 1, C))  # in-context learning rate
        self.a1, self.a2 = _lora(C, cfg.iclr_lora, C)
        if layer_id > 0:  # value residual towards layer 0's value; layer 0 has nothing to mix with
            self.v0 = nn.Parameter(torch.zeros(1, 1, C))
            self.v1, self.v2 = _lora(C, cfg.value_lora, C)
        self.g1, self.g2 = _lora(C, cfg.gate_lora, C)  # output gate
        self.k_k = nn.Parameter(torch.zeros(1, 1, C))  # key -> removal key (kk)
        self.k_a = nn.Parameter(torch.zeros(1, 1, C))  # how much a scales the key
        self.r_k = nn.Parameter(torch.zeros(H, N))  # "bonus" for the current token
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)  # the official eps; it matters for parity

    def forward(self, x, shift, wkv_state, v_first):
        """x [B, T, C]; shift [B, C]; wkv_state [B, H, N, N] -> (out, new shift, new wkv_state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        d = torch.cat([shift.unsqueeze(1), x[:, :-1]], dim=1) - x
        xr, xw, xk, xv, xa, xg = (x + d * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        log_w = -DECAY_SCALE * torch.sigmoid((self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float())
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        heads = (r.view(B, T, H, N), log_w.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
                 -kk, kk * a.view(B, T, H, N))
        if T == 1:  # RNN mode
            y, wkv_state = wkv7_one(wkv_state, *(h[:, 0] for h in heads))
            y = y.unsqueeze(1)
        else:  # parallel mode
            y, wkv_state = wkv7(*heads, initial_state=wkv_state)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads[0] * heads[2] * self.r_k).sum(-1, keepdim=True) * heads[3]
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state, v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x, shift):
        """x [B, T, C]; shift [B, C] -> (out [B, T, C], new shift)."""
        prev = torch.cat([shift.unsqueeze(1), x[:, :-1]], dim=1)
        k = x + (prev - x) * self.x_k
        return self.value(torch.relu(self.key(k)).square()), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)  # normalizes the embeddings
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, state: LayerState):
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        h, att_shift, wkv_state, v_first = self.att(self.ln1(x), state.att_shift, state.wkv, v_first)
        x = x + h
        h, ffn_shift = self.ffn(self.ln2(x), state.ffn_shift)
        return x + h, v_first, LayerState(att_shift, wkv_state, ffn_shift)


class RWKV(nn.Module):
    def __init__(self, cfg: RWKVConfig):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def init_state(self, batch_size: int = 1) -> RWKVState:
        cfg, p = self.config, self.emb.weight
        return RWKVState.zeros(cfg.n_layer, batch_size, cfg.n_embd, cfg.n_head, cfg.head_size,
                               device=p.device, dtype=p.dtype)

    def forward(self, tokens: torch.Tensor, state: RWKVState | None = None, *, last_only: bool = False):
        """Parallel mode. tokens [B, T] -> (logits [B, T, V] (or [B, 1, V] with last_only), new state).

        Starts from `state` (zeros when None), so a long prompt can be fed in pieces.
        """
        B, T = self.check_tokens(tokens, 2)
        state = self.check_state(state, B)
        x = self.emb(tokens)
        v_first, layers = None, []
        for block, layer_state in zip(self.blocks, state.layers):
            x, v_first, layer_state = block(x, v_first, layer_state)
            layers.append(layer_state)
        if last_only:
            x = x[:, -1:]
        return self.head(self.ln_out(x)), RWKVState(layers)

    def step(self, tokens: torch.Tensor, state: RWKVState | None = None):
        """RNN mode: one token per row. tokens [B] -> (logits [B, V], new state)."""
        self.check_tokens(tokens, 1, ids=False)  # (forward checks the ids)
        logits, state = self(tokens.unsqueeze(1), state)
        return logits[:, 0], state

    def check_tokens(self, tokens, dims, *, ids: bool = True):
        """The shape of `tokens` ([B, T] for dims=2, [B] for 1), or a ValueError saying what does not fit. Ids are
        range-checked on the CPU only (ids=False: not at all, the caller does): on a GPU that would wait for the
        device at every step (an id out of range fails in the embedding there)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != dims or tokens.is_floating_point():
            shape = "[B, T]" if dims == 2 else "[B]"
            raise ValueError(f"tokens must be an integer tensor of shape {shape}, got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.numel() == 0:
            raise ValueError("tokens is empty: give at least one token")
        if ids and tokens.device.type == "cpu":
            lo, hi = map(int, torch.aminmax(tokens))
            if lo < 0 or hi >= self.config.vocab_size:
                bad = hi if hi >= self.config.vocab_size else lo
                raise ValueError(f"token id {bad} is outside this model's vocabulary [0, {self.config.vocab_size}); "
                                 "was the text encoded with another tokenizer?")
        return tokens.shape

    def check_state(self, state, batch_size):
        """`state` (zeros for None) if it fits this model and batch size, else a ValueError saying what does not."""
        if state is None:
            return self.init_state(batch_size)
        cfg = self.config
        want = (batch_size, cfg.n_head, cfg.head_size, cfg.head_size)
        if not isinstance(state, RWKVState) or len(state.layers) != cfg.n_layer or tuple(state.layers[0].wkv.shape) != want \
                or state.layers[0].att_shift.shape[-1] != cfg.n_embd:
            got = f"{len(state.layers)} layers, wkv {tuple(state.layers[0].wkv.shape)}" if isinstance(state, RWKVState) else type(state).__name__
            raise ValueError(f"state does not fit this model: expected {cfg.n_layer} layers with wkv {want}, got {got}; "
                             "start from model.init_state(batch_size) or a state made by this model")
        return state

    def num_params(self, include_embedding: bool = True) -> int:
        n = parameter_count(self)
        return n if include_embedding else n - self.emb.weight.numel()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """The official initialization (RWKV-LM train_temp), for training from scratch."""
        cfg = self.config
        C, N, L, V = cfg.n_embd, cfg.head_size, cfg.n_layer, cfg.vocab_size
        ramp = torch.arange(C) / C  # i / C
        linear = torch.arange(C) / (C - 1) - 0.5
        zigzag = ((torch.arange(C) % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()

        def orthogonal(p, gain):
            nn.init.orthogonal_(p, gain=gain, generator=generator)

        self.emb.weight.uniform_(-1e-4, 1e-4, generator=generator)
        orthogonal(self.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5)
        for norm in (m for m in self.modules() if isinstance(m, nn.LayerNorm)):
            norm.reset_parameters()
        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            ratio_0_to_1 = i / max(L - 1, 1)
            ratio_1_to_0 = 1.0 - i / L
            for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(att, name).copy_((1.0 - ramp.pow(power * ratio_1_to_0)).view(1, 1, C))
            ffn.x_k.copy_((1.0 - ramp.pow(ratio_1_to_0**4)).view(1, 1, C))

            decay_base = -6 + 6 * (torch.arange(C) / (C - 1)) ** (1 + ratio_0_to_1**0.3)
            att.w0.copy_((decay_base + 0.5 + zigzag * 2.5).view(1, 1, C))
            att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
            att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            lora_pairs = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
            if i > 0:
                att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
                lora_pairs.append((att.v1, att.v2))
            for down, up in lora_pairs:
                down.zero_()
                orthogonal(up, 0.1)
            att.ln_x.reset_parameters()
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            orthogonal(att.receptance.weight, 1.0)
            orthogonal(att.key.weight, 0.1)
            orthogonal(att.value.weight, 1.0)
            att.output.weight.zero_()
            orthogonal(ffn.key.weight, 1.0)
            ffn.value.weight.zero_()
        return self
