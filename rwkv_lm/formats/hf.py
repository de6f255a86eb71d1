"""Hugging Face folders in the fla-hub `RWKV7ForCausalLM` layout (flash-linear-attention's RWKV-7), both ways.

A folder holds config.json, model.safetensors (or shards named by model.safetensors.index.json) and the
tokenizer: tokenizer.json for a BPE, rwkv_vocab_v20230424.txt for the World vocabulary (the file fla-hub's
folders and llama.cpp's converter read). fla keeps each LoRA as a small MLP, `x_lora.lora.0` (down,
[rank, C]) and `x_lora.lora.2` (up, [C, rank], its bias the x0 vector), where ours are the official
[C, rank] / [rank, C] matrices: transposed both ways.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..files import CheckpointError, atomic_write
from ..model import RWKVConfig

WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
_LORA = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}  # our prefix -> fla's module


def _names(cfg: RWKVConfig) -> list[tuple[str, str, str]]:
    """(our name, fla's name, how it changes on the way out): "same", "T" (transposed) or "flat" ([1, 1, C] -> [C])."""
    names = [("emb.weight", "model.embeddings.weight", "same"), ("ln_out.weight", "model.norm.weight", "same"),
             ("ln_out.bias", "model.norm.bias", "same"), ("head.weight", "lm_head.weight", "same"),
             ("blocks.0.ln0.weight", "model.layers.0.pre_norm.weight", "same"),
             ("blocks.0.ln0.bias", "model.layers.0.pre_norm.bias", "same")]
    for i in range(cfg.n_layer):
        o, f = f"blocks.{i}.", f"model.layers.{i}."
        names += [(o + f"ln{n}.{p}", f + f"{norm}.{p}", "same")
                  for n, norm in ((1, "attn_norm"), (2, "ffn_norm")) for p in ("weight", "bias")]
        names += [(o + f"att.x_{m}", f + f"attn.x_{m}", "same") for m in "rwkvag"]
        names += [(o + "att.k_k", f + "attn.k_k", "flat"), (o + "att.k_a", f + "attn.k_a", "flat"),
                  (o + "att.r_k", f + "attn.r_k", "same")]
        names += [(o + f"att.{ours}.weight", f + f"attn.{fla}.weight", "same")
                  for ours, fla in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj"))]
        names += [(o + "att.ln_x.weight", f + "attn.g_norm.weight", "same"), (o + "att.ln_x.bias", f + "attn.g_norm.bias", "same")]
        for p, module in _LORA.items():
            if p == "v" and i == 0:
                continue  # layer 0 has no value residual, in both layouts
            names += [(o + f"att.{p}1", f + f"attn.{module}.lora.0.weight", "T"),
                      (o + f"att.{p}2", f + f"attn.{module}.lora.2.weight", "T")]
            if p != "g":
                names.append((o + f"att.{p}0", f + f"attn.{module}.lora.2.bias", "flat"))
        names += [(o + "ffn.x_k", f + "ffn.x_k", "flat"), (o + "ffn.key.weight", f + "ffn.key.weight", "same"),
                  (o + "ffn.value.weight", f + "ffn.value.weight", "same")]
    return names


def _config_json(cfg: RWKVConfig, tokenizer) -> dict:
    eos = 0 if tokenizer is not None else None  # token 0 ends a document in RWKV's vocabularies and our BPEs
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size, "num_heads": None, "intermediate_size": cfg.dim_ffn, "hidden_ratio": 4,
        "decay_low_rank_dim": cfg.decay_lora, "a_low_rank_dim": cfg.iclr_lora,
        "v_low_rank_dim": cfg.value_lora, "gate_low_rank_dim": cfg.gate_lora,
        "value_dim": [cfg.n_embd] * cfg.n_layer,
        # fla's GroupNorm eps is head_dim * norm_eps; ours (the official one) is 64e-5, the same at head_dim 64
        "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": 1e-5,
        "attn": None, "attn_mode": "chunk", "fuse_norm": True, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None, "torch_dtype": "float32",
    }


def write_hf(sd: dict[str, torch.Tensor], cfg: RWKVConfig, folder, *, dtype=torch.float32, tokenizer=None) -> Path:
    """Write an RWKV-7's floating-point tensors (our names) as a Hugging Face folder in the fla-hub layout
    (config.json, model.safetensors, the tokenizer)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; a Hugging Face model is a folder")
    tensors = {}
    for ours, fla, how in _names(cfg):
        t = sd[ours].detach().to("cpu", dtype)
        tensors[fla] = (t.T if how == "T" else t.reshape(-1) if how == "flat" else t).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_text(folder / CONFIG, json.dumps(_config_json(cfg, tokenizer), indent=2))
    if tokenizer is not None:
        if tokenizer.spec == "world":
            from ..tokenizer.world import VOCAB_FILE

            atomic_write(folder / WORLD_VOCAB, lambda tmp: shutil.copyfile(VOCAB_FILE, tmp))
        else:
            _write_text(folder / "tokenizer.json", tokenizer.spec)
    return folder


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_hf(folder) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors under our names, config dict, metadata) of an fla-hub RWKV-7 folder."""
    folder = Path(folder)
    try:
        hf = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: a folder without {CONFIG}; a Hugging Face model folder has one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: not valid JSON ({e})") from None
    if hf.get("model_type") not in ("rwkv7", "rwkv7_fla") and "RWKV7ForCausalLM" not in hf.get("architectures", []):
        raise CheckpointError(f"{folder / CONFIG}: model_type {hf.get('model_type')!r} is not fla's RWKV-7 (rwkv7)")
    if hf.get("attn"):
        raise CheckpointError(f"{folder / CONFIG}: a hybrid with attention layers ({hf['attn']}); only pure RWKV-7 is read")
    try:
        config = RWKVConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
            head_size=hf.get("head_dim") or hf["hidden_size"] // hf["num_heads"],
            dim_ffn=hf.get("intermediate_size") or 0, decay_lora=hf["decay_low_rank_dim"],
            iclr_lora=hf["a_low_rank_dim"], value_lora=hf["v_low_rank_dim"], gate_lora=hf["gate_low_rank_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: does not describe an RWKV-7 ({e!r} missing or wrong)") from None
    weights = _read_weights(folder)
    sd = {}
    for ours, fla, how in _names(config):
        if fla not in weights:
            raise CheckpointError(f"{folder}: missing tensor {fla!r}; is this an fla-hub RWKV-7 folder?")
        t = weights[fla]
        sd[ours] = t.T.contiguous() if how == "T" else t.reshape(1, 1, -1) if how == "flat" else t
    meta = {"format": "hf"}
    if (folder / "tokenizer.json").is_file():
        meta["tokenizer"] = (folder / "tokenizer.json").read_text(encoding="utf-8")
    elif (folder / WORLD_VOCAB).is_file():
        meta["tokenizer"] = "world"
    return sd, config.to_dict(), meta


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards its index names."""
    if (folder / INDEX).is_file():
        try:
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{folder / INDEX}: not a safetensors index ({e!r})") from None
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS} (nor {INDEX}); only safetensors weights are read")
    weights = {}
    for name in files:
        path = folder / name
        try:
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    weights[k] = _get(f, k, path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors; it is truncated or corrupt ({e})") from None
    return weights


def _get(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {name!r} cannot be read; the file is truncated or corrupt ({e})") from None
