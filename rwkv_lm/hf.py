"""A Hugging Face `transformers` causal LM behind the package's model interface, so the serving engine, the
demo's Arena and the benchmarks run a real transformer (Pythia, SmolLM2, ...) beside RWKV-7.

`load_hf(name_or_path)` gives a `HFCausalLM`: `model(tokens, state, last_only=)`, `model.step(tokens, state)`,
`init_state(B)`, `.config.vocab_size`, `.tokenizer` (the model's own tokenizer.json). Its state is its KV
cache as a `GPTState` (keys and values per layer, left-padded to a common length, positions per row), so
rows of any lengths batch together as the GPT baseline's do. Needs `pip install 'rwkv-lm[hf]'`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .gpt import GPTState
from .model import RWKV, parameter_count
from .tokenizer import BPETokenizer


@dataclass
class HFConfig:
    """What the package reads of a transformers model's config."""

    name: str  # the path or hub name it was loaded from
    arch: str  # its class, e.g. LlamaForCausalLM
    vocab_size: int
    n_layer: int
    n_embd: int
    n_kv_head: int
    head_size: int


class HFCausalLM(nn.Module):
    """A transformers causal LM (`AutoModelForCausalLM`) with the RWKV model's interface; the KV cache is its state."""

    def __init__(self, hf_model, tokenizer: BPETokenizer | None, name: str):
        super().__init__()
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        c = hf_model.config.get_text_config(decoder=True)
        head_size = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.config = HFConfig(name, type(hf_model).__name__, c.vocab_size, c.num_hidden_layers, c.hidden_size,
                               getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_size)

    def init_state(self, batch_size: int = 1) -> GPTState:
        cfg = self.config
        return GPTState.empty(batch_size, cfg.n_layer, cfg.n_kv_head, cfg.head_size, next(self.parameters()))

    def forward(self, tokens: torch.Tensor, state: GPTState | None = None, *, last_only: bool = False):
        """tokens [B, T] -> (logits [B, T, V] (or [B, 1, V] with last_only), the cache with these tokens added)."""
        from transformers import DynamicCache

        B, T = self.check_tokens(tokens, 2)
        state = self.check_state(state, B)
        S = state.k[0].shape[2]
        cache = DynamicCache(config=self.hf.config)
        if S > 0:  # the state's tensors as they are: update() would copy every layer's cache once more per call
            for layer, k, v in zip(cache.layers, state.k, state.v):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
        # row b's real cache slots are its last pos[b]; the ones before are padding from batching
        col = torch.arange(S + T, device=tokens.device)
        mask = (col[None, :] >= (S - state.pos)[:, None]).long()  # [B, S + T]
        positions = state.pos[:, None] + torch.arange(T, device=tokens.device)
        out = self.hf(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True, logits_to_keep=1 if last_only else 0)
        layers = cache.layers  # updated in place with these tokens
        return out.logits.float(), GPTState([l.keys for l in layers], [l.values for l in layers], state.pos + T)

    def step(self, tokens: torch.Tensor, state: GPTState | None = None):
        """One token per row. tokens [B] -> (logits [B, V], new state)."""
        self.check_tokens(tokens, 1, ids=False)  # (forward checks the ids)
        logits, state = self(tokens.unsqueeze(1), state)
        return logits[:, 0], state

    check_tokens = RWKV.check_tokens

    def check_state(self, state, batch_size):
        if state is None:
            return self.init_state(batch_size)
        cfg = self.config
        if not isinstance(state, GPTState) or len(state.k) != cfg.n_layer or \
                (state.k[0].shape[0], state.k[0].shape[1], state.k[0].shape[3]) != (batch_size, cfg.n_kv_head, cfg.head_size):
            raise ValueError(f"state does not fit {cfg.name}: expected a KV cache of {cfg.n_layer} layers with k "
                             f"[{batch_size}, {cfg.n_kv_head}, S, {cfg.head_size}]; start from model.init_state(batch_size)")
        return state

    def num_params(self) -> int:
        return parameter_count(self)


def is_hf_model(spec: str | Path) -> bool:
    """Whether `spec` names a transformers model: a folder with a config.json, or a hub name (org/name)
    that is no file here."""
    path = Path(spec)
    if path.is_dir():
        return (path / "config.json").is_file()
    return not path.exists() and str(spec).count("/") == 1 and not str(spec).endswith((".pth", ".safetensors"))


def load_hf(name_or_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """A transformers causal LM and its tokenizer (from a folder saved by `save_pretrained`, or a hub name
    where the hub is reachable), in `dtype` on `device`; ValueError naming what is wrong."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError(f"{name_or_path}: a transformers model needs the transformers package: "
                         "pip install 'rwkv-lm[hf]'") from None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, attn_implementation="sdpa")
        hf_tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{name_or_path}: cannot be loaded as a transformers causal LM "
                         f"({' '.join(str(e).split())[:300]})") from None
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{name_or_path}: its tokenizer has no tokenizer.json (a 'fast' tokenizer); "
                         "save one with tokenizer.save_pretrained after AutoTokenizer.from_pretrained(..., use_fast=True)")
    return HFCausalLM(hf_model.to(device), BPETokenizer(backend), str(name_or_path))
