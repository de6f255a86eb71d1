"""What a fine-tuning run trains and what it exports (`model.tune`), one type per mode:

- `Tuning` ("full"): every weight trains; the export is the model.
- `StateTuning` ("state"): only each layer's initial WKV state ([n_layer, H, N, N]), the state every training
  sequence starts from, trains (RWKV's own cheap fine-tune); the export is a state file.
- `LoraTuning` ("lora"): LoRA adapters on the blocks' Linear layers (rwkv_lm.lora) train; the export is the
  model with the adapters merged, or the adapters alone.

A mode is a module beside the model (its parameters are the trained ones); `checkpoint_info` and
`from_checkpoint` carry it through a trainer checkpoint to `python -m train export`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from rwkv_lm.checkpoint import export_official, save
from rwkv_lm.files import CheckpointError
from rwkv_lm.lora import LoRA, save_adapter
from rwkv_lm.model import RWKV
from rwkv_lm.state import RWKVState
from rwkv_lm.statefile import save_state


class Tuning(nn.Module):
    """Full fine-tuning: the model's own weights train."""

    name = "full"

    def __init__(self, model: nn.Module, **settings):
        super().__init__()

    def start_state(self, model, batch_size: int) -> RWKVState | None:
        """The state every training sequence starts from (None: zeros)."""
        return None

    def checkpoint_info(self) -> dict:
        """What `from_checkpoint` needs besides the parameters."""
        return {}

    def export(self, model, out, *, tokenizer: str | None, step: int, adapter: bool = False) -> Path:
        """Write what this run made for the runtime: `.pth` the official layout, else our format."""
        if adapter:
            raise CheckpointError(f"--adapter needs a run with model.tune lora; this one tuned {self.name!r}")
        if str(out).endswith(".pth"):
            return export_official(model, out)
        return save(model, out, tokenizer=tokenizer, metadata={"trained_steps": step})


class StateTuning(Tuning):
    """Only the initial WKV state of each layer trains; the weights stay frozen."""

    name = "state"

    def __init__(self, model: nn.Module, **settings):
        super().__init__(model)
        _needs_rwkv(model, self.name)
        model.requires_grad_(False)
        cfg = model.config
        self.time_state = nn.Parameter(torch.zeros(cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size))

    def start_state(self, model, batch_size: int) -> RWKVState:
        return model.init_state(batch_size).with_wkv(self.time_state)

    def export(self, model, out, *, tokenizer, step, adapter=False) -> Path:
        if adapter:
            return super().export(model, out, tokenizer=tokenizer, step=step, adapter=adapter)
        return save_state(list(self.time_state.detach()), out, config=model.config.to_dict())


class LoraTuning(Tuning):
    """LoRA adapters on the blocks' Linear layers train; the weights stay frozen."""

    name = "lora"

    def __init__(self, model: nn.Module, lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0, **settings):
        super().__init__(model)
        _needs_rwkv(model, self.name)
        model.requires_grad_(False)
        self.lora = LoRA(model, lora_rank, lora_alpha, lora_dropout)

    def checkpoint_info(self) -> dict:
        return {"lora_rank": self.lora.rank, "lora_alpha": self.lora.alpha}

    def export(self, model, out, *, tokenizer, step, adapter=False) -> Path:
        if adapter:
            return save_adapter(self.lora, out, config=model.config.to_dict())
        self.lora.merge()
        return super().export(model, out, tokenizer=tokenizer, step=step)


MODES = {mode.name: mode for mode in (Tuning, StateTuning, LoraTuning)}


def _needs_rwkv(model, name):
    if not isinstance(model, RWKV):
        raise ValueError(f"model.tune {name!r} needs an RWKV-7 model, not {type(model).__name__}; use model.tune full")


def from_checkpoint(info: dict, model, state_dict: dict, source) -> Tuning:
    """The tuning a trainer checkpoint's `rwkv_lm` entry names, its parameters loaded from `state_dict`."""
    name = info.get("tune", "full")
    if name not in MODES:
        raise CheckpointError(f"{source}: unknown tuning {name!r}; known: {', '.join(MODES)}")
    tuning = MODES[name](model, **info.get("tuning", {}))
    tuning.load_state_dict({k.removeprefix("tuning."): v for k, v in state_dict.items() if k.startswith("tuning.")})
    return tuning
