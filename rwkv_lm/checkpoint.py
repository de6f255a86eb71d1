"""Checkpoints: our format (one safetensors file, config and tokenizer in its metadata) and BlinkDL's
official RWKV-7 `.pth` files, both ways. Every failure is a `CheckpointError` that names the file and
what is wrong with it; files are written atomically, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .fast import optimize
from .gpt import GPT, GPTConfig
from .model import RWKV, RWKVConfig

FORMAT = "rwkv_lm"
# arch name -> (model class, config class); other architectures register themselves here.
ARCHITECTURES: dict[str, tuple[type, type]] = {"rwkv7": (RWKV, RWKVConfig), "gpt": (GPT, GPTConfig)}


class CheckpointError(ValueError):
    """A file that cannot be loaded as a model, with the reason."""


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then move the finished file over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make it private; give the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save(model, path, *, tokenizer: str | None = None, metadata: dict | None = None) -> Path:
    """Write `model` in our format: weights as safetensors, the config (and tokenizer) as metadata.

    tokenizer: a tokenizer spec to carry with the weights ("world", or a tokenizer.json text).
    """
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _kind(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return "official"
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path}: not a model checkpoint (not a safetensors file, a PyTorch .pth zip or GGUF); "
                          "pass a file written by rwkv_lm.save, an official RWKV-7 .pth, a GGUF file or a "
                          "Hugging Face folder")


def read_official(path) -> dict[str, torch.Tensor]:
    """The tensors of an official `.pth`, opened with weights_only=True (no code in the file runs)."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the file holds pickled objects other than tensors, which could "
                              f"run code. Only plain state dicts are accepted ({str(e).splitlines()[0]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint; it is truncated or corrupt "
                              f"({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def read(path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, config dict, metadata) of any format; the config of an official file comes from its shapes.
    A hub name (hf:OWNER/REPO/FILE) is read from huggingface_hub's cache, downloaded there first if needed."""
    from . import formats
    from .formats.hub import is_hub_name, resolve

    path = resolve(path) if is_hub_name(path) else Path(path)
    kind = "hf" if path.is_dir() else _kind(path)  # a folder is a Hugging Face model
    if kind in ("gguf", "hf"):
        return formats.read(kind, path)
    if kind == "official":
        sd = read_official(path)
        for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1", "blocks.0.ffn.key.weight"):
            if key not in sd:
                raise CheckpointError(f"{path}: missing tensor {key!r}; is this an RWKV-7 (x070) checkpoint?")
        # layer 0 has no value residual: official files carry unused (or no) v0/v1/v2 there
        sd = {k: v for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}
        return sd, RWKVConfig.from_state_dict(sd).to_dict(), {"format": "official"}
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors; it is truncated or corrupt ({e})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without an rwkv_lm config in its metadata; "
                              "write checkpoints with rwkv_lm.save")
    return sd, json.loads(meta["config"]), meta


def read_tagged(path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file whose metadata says format `fmt`; else a CheckpointError
    saying the file is not `what` (e.g. "a state file; write one with ...")."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors; it is truncated or corrupt ({e})") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: not {what}")
    return tensors, meta


def build(config: dict):
    """An empty model for a config dict (as stored in a checkpoint)."""
    config = dict(config)
    arch = config.pop("arch", "rwkv7")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[arch]
    return model_cls(config_cls(**config))


def copy_tensors(model, sd: dict[str, torch.Tensor], source) -> None:
    """Copy tensors into `model` by name, after checking that every name and shape fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
                              + "; this model variant is not supported")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not v.is_floating_point() and v.dtype != expected[k].dtype:  # (int8 weights load into int8 ones)
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected floating point")
    model.load_state_dict(sd)


def load(path, *, device="cpu", dtype=torch.float32, fast=True):
    """Load a model from our format or an official RWKV-7 `.pth`; the model is in eval mode.

    `model.tokenizer` is the tokenizer the file names (World for official 65536-token files) or None.
    fast: an fp32 RWKV-7 on the CPU comes prepared for inference by `rwkv_lm.fast.optimize` (decode steps in
    the C kernels, no parameter requiring grad; int8 weights saved from `optimize(model, weights="int8")` load
    as they are); fast=False gives model.py's modules as they are (int8 weights dequantized), for training.
    """
    sd, config, meta = read(path)
    try:
        model = build(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not describe a model: {e}") from None
    fast = fast and isinstance(model, RWKV) and torch.device(device).type == "cpu" and dtype == torch.float32
    if any(v.dtype == torch.int8 for v in sd.values()):
        if fast:
            optimize(model, weights="int8")  # the int8 layers the file's tensors go into
        else:
            sd = dequantize(sd, path)
    copy_tensors(model, sd, path)
    model.metadata = meta
    model.tokenizer = _tokenizer(meta, config, path)
    model = model.to(device=device, dtype=dtype).eval()
    return optimize(model) if fast else model


def dequantize(sd: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """The tensors with each int8 weight times its per-row scale (as `optimize(weights="int8")` saves them) as one
    fp32 weight, what model.py's Linear layers take."""
    scales = {k.removesuffix("weight") + "scale" for k, v in sd.items() if v.dtype == torch.int8}
    out = {k: v for k, v in sd.items() if k not in scales}
    for k, v in sd.items():
        if v.dtype == torch.int8:
            scale = sd.get(k.removesuffix("weight") + "scale")
            if not k.endswith(".weight") or scale is None or scale.shape != v.shape[:1]:
                raise CheckpointError(f"{source}: int8 tensor {k!r} has no per-row scale beside it; write quantized "
                                      "models with rwkv_lm.save(optimize(model, weights='int8'), path)")
            out[k] = v.float() * scale.float()[:, None]
    return out


def _tokenizer(meta: dict, config: dict, path):
    """The tokenizer a checkpoint names; official World-sized files get the World tokenizer; else None."""
    from .tokenizer import load_tokenizer

    spec = meta.get("tokenizer")
    if spec is None:
        return load_tokenizer("world") if meta["format"] == "official" and config["vocab_size"] == 65536 else None
    try:
        return load_tokenizer(spec)
    except ValueError as e:
        raise CheckpointError(f"{path}: its tokenizer cannot be loaded: {e}") from None


def export_official(model, path, *, dtype=torch.bfloat16) -> Path:
    """Write an RWKV-7 in the official `.pth` layout (bf16 by default, as BlinkDL's files are)."""
    if not isinstance(model, RWKV):
        raise CheckpointError(f"only RWKV-7 models have an official layout, not {type(model).__name__}")
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    cfg = model.config
    # official files carry layer 0's (unused) value-residual tensors; zeros keep every loader happy
    sd["blocks.0.att.v0"] = torch.zeros(1, 1, cfg.n_embd, dtype=dtype)
    sd["blocks.0.att.v1"] = torch.zeros(cfg.n_embd, cfg.value_lora, dtype=dtype)
    sd["blocks.0.att.v2"] = torch.zeros(cfg.value_lora, cfg.n_embd, dtype=dtype)
    return atomic_write(path, lambda tmp: torch.save(sd, tmp))
