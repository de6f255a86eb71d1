"""LoRA adapters (Hu et al. 2021) on an RWKV-7's Linear layers: y = W x + (alpha / rank) B A dropout(x).

Adapted: the six Linear layers of every block (att.receptance, att.key, att.value, att.output, ffn.key,
ffn.value). The head, the embedding, the norms, the token-shift mixes and the time mix's own low-rank
matrices (w1/w2, a1/a2, v1/v2, g1/g2: already rank 8-64) stay frozen. A is [rank, in] (nn.Linear's
initialization), B is [out, rank] zeros, so training starts from the model as it is.

The adapters sit beside the model (forward hooks on its Linear layers), so its own tensors and their names
stay untouched: `merge` adds B A into the weights for deployment; `save_adapter` / `apply_adapter` keep
the adapters as a file of their own (safetensors, keys `<linear>.lora_A` / `.lora_B`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from .files import CheckpointError, atomic_write, read_tagged
from .runtime.cpu import KernelLinear

FORMAT = "rwkv_lm.lora"
TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def target_layers(model) -> dict[str, nn.Linear]:
    """name -> Linear for every adapted layer of `model`."""
    return {f"blocks.{i}.{t}": block.get_submodule(t) for i, block in enumerate(model.blocks) for t in TARGETS}


class Adapter(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale, self.dropout = scale, nn.Dropout(dropout)

    def delta(self) -> torch.Tensor:
        """What the adapter adds to the Linear's weight [out, in]."""
        return self.scale * (self.lora_B @ self.lora_A)

    def hook(self, linear, args, out):
        return out + self.scale * F.linear(F.linear(self.dropout(args[0]), self.lora_A), self.lora_B)


class LoRA(nn.Module):
    """Adapters for every layer of `target_layers(model)`, active (unmerged) in the model's forward."""

    def __init__(self, model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not hasattr(model, "blocks") or not all(hasattr(b, "att") for b in model.blocks):
            raise ValueError(f"LoRA adapts RWKV-7 blocks; {type(model).__name__} has none")
        if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got {rank}, {alpha}, {dropout}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        layers = target_layers(model)
        # ModuleDict keys cannot hold dots
        self.adapters = nn.ModuleDict({n.replace(".", "/"): Adapter(m, rank, alpha / rank, dropout) for n, m in layers.items()})
        self._hooks = [m.register_forward_hook(self.adapters[n.replace(".", "/")].hook) for n, m in layers.items()]
        self._layers = layers

    def named_adapters(self):
        return ((name.replace("/", "."), adapter) for name, adapter in self.adapters.items())

    def remove(self) -> None:
        """Take the adapters out of the model's forward (the model is as it was, unless merged)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def merge(self):
        """Add each adapter into its Linear's weight and take the adapters out: the model alone now computes
        what model + adapters did (dropout aside)."""
        for name, adapter in self.named_adapters():
            layer = self._layers[name]
            # [out, in] in and out whatever the layer stores (a CPU-prepared one: fp32 panels, int8, int4), which
            # its load_state_dict stores the merged weight as again
            weight = layer.dense_weight() if isinstance(layer, KernelLinear) else layer.weight
            merged = (weight.float() + adapter.delta().float().to(weight.device)).to(weight.dtype)
            layer.load_state_dict({"weight": merged}, strict=False)
        self.remove()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{p}": getattr(adapter, p).detach().float().cpu().contiguous()
                for name, adapter in self.named_adapters() for p in ("lora_A", "lora_B")}


def save_adapter(lora: LoRA, path, *, config: dict | None = None) -> Path:
    """Write the adapters unmerged (safetensors; rank, alpha and the base model's config in the metadata)."""
    meta = {"format": FORMAT, "rank": str(lora.rank), "alpha": str(lora.alpha), "config": json.dumps(config or {})}
    tensors = lora.tensors()
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def apply_adapter(model, path):
    """Merge an adapter file written by `save_adapter` into `model`'s weights (in place; returns the model)."""
    tensors, meta = read_tagged(path, FORMAT, "a LoRA adapter file; write one with `python -m train export CKPT OUT --adapter`")
    lora = LoRA(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]))
    expected = lora.tensors()
    if set(tensors) != set(expected) or any(tensors[k].shape != v.shape for k, v in expected.items()):
        lora.remove()
        config = json.loads(meta.get("config") or "{}")
        made = ", ".join(f"{k}={config[k]}" for k in ("n_layer", "n_embd", "dim_ffn") if k in config)
        raise CheckpointError(f"{path}: the adapters were made for another model shape ({made or 'unknown'}); this model "
                              f"has n_layer={model.config.n_layer}, n_embd={model.config.n_embd}, dim_ffn={model.config.dim_ffn}")
    with torch.no_grad():
        for name, adapter in lora.named_adapters():
            adapter.lora_A.copy_(tensors[f"{name}.lora_A"])
            adapter.lora_B.copy_(tensors[f"{name}.lora_B"])
    lora.merge()
    return model
