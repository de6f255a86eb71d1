"""The RNN state of an RWKV-7 model: a few fixed-size tensors per layer, whatever the context length."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class LayerState:
    """One layer's memory: the last inputs of the two token shifts and the WKV matrix."""

    att_shift: torch.Tensor  # [B, C], model dtype: last input to the time mix
    wkv: torch.Tensor  # [B, H, N, N] fp32, value x key
    ffn_shift: torch.Tensor  # [B, C], model dtype: last input to the channel mix

    def map(self, fn) -> "LayerState":
        return LayerState(*(fn(getattr(self, f.name)) for f in fields(self)))


class ModelState:
    """What every model's state offers, built on its `map(fn)` (a new state of fn(tensor)) and `tensors()`."""

    def map(self, fn):
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def row_nbytes(self) -> list[int]:
        """Each batch row's share of `nbytes`."""
        return [self.nbytes // self.batch_size] * self.batch_size

    def clone(self):
        return self.map(torch.clone)

    def detach(self):
        return self.map(torch.Tensor.detach)

    def to(self, device):
        return self.map(lambda t: t.to(device))


@dataclass
class RWKVState(ModelState):
    """Per-layer states for a batch. Methods return new objects; nothing is changed in place."""

    layers: list[LayerState]

    @classmethod
    def zeros(cls, n_layer, batch_size, n_embd, n_head, head_size, *, device=None, dtype=torch.float32):
        def layer():
            return LayerState(
                torch.zeros(batch_size, n_embd, device=device, dtype=dtype),
                torch.zeros(batch_size, n_head, head_size, head_size, device=device, dtype=torch.float32),
                torch.zeros(batch_size, n_embd, device=device, dtype=dtype),
            )

        return cls([layer() for _ in range(n_layer)])

    def map(self, fn) -> "RWKVState":
        return RWKVState([layer.map(fn) for layer in self.layers])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view, as written to a state file."""
        return {f"layers.{i}.{f.name}": getattr(layer, f.name) for i, layer in enumerate(self.layers) for f in fields(layer)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RWKVState":
        n_layer = 1 + max(int(name.split(".")[1]) for name in tensors)
        return cls([LayerState(*(tensors[f"layers.{i}.{f.name}"] for f in fields(LayerState))) for i in range(n_layer)])

    @property
    def batch_size(self) -> int:
        return self.layers[0].wkv.shape[0]

    def with_wkv(self, wkv) -> "RWKVState":
        """This state with each layer's WKV matrix replaced by `wkv[i]` ([B, H, N, N], or [H, N, N] / [1, H, N, N]
        for every row), in this state's dtype and device, token shifts kept: a tuned state as a starting state
        (gradients flow back into `wkv`)."""
        if len(wkv) != len(self.layers):
            raise ValueError(f"{len(wkv)} WKV states for a state of {len(self.layers)} layers")
        return RWKVState([LayerState(layer.att_shift, w.to(layer.wkv).expand(layer.wkv.shape), layer.ffn_shift)
                          for layer, w in zip(self.layers, wkv)])

    def select(self, rows) -> "RWKVState":
        """The states of some batch rows (a list, slice or index tensor)."""
        return self.map(lambda t: t[rows])

    @classmethod
    def cat(cls, states: list["RWKVState"]) -> "RWKVState":
        """Stack several states along the batch dimension."""
        return cls([
            LayerState(*(torch.cat([getattr(s.layers[i], f.name) for s in states]) for f in fields(LayerState)))
            for i in range(len(states[0].layers))
        ])
