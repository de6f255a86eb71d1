"""Checkpoints: our format (one safetensors file, config and tokenizer in its metadata) and BlinkDL's
official RWKV-7 `.pth` files, both ways. Every failure is a `CheckpointError` that names the file and
what is wrong with it; files are written atomically, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from .files import CheckpointError, atomic_write, file_kind, read_pth, read_tagged
from .ops.cpu_kernels import INT4_GROUP, dequantize_int4
from .gpt import GPT, GPTConfig
from .model import RWKV, RWKVConfig

FORMAT = "rwkv_lm"
# arch name -> (model class, config class); other architectures register themselves here.
ARCHITECTURES: dict[str, tuple[type, type]] = {"rwkv7": (RWKV, RWKVConfig), "gpt": (GPT, GPTConfig)}


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


def read(path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, config dict, metadata) of any format; the config of an official file comes from its shapes.
    A hub name (hf:OWNER/REPO/FILE) is read from huggingface_hub's cache, downloaded there first if needed."""
    from . import formats
    from .formats.hub import is_hub_name, resolve

    path = resolve(path) if is_hub_name(path) else Path(path)
    kind = "hf" if path.is_dir() else file_kind(path)  # a folder is a Hugging Face model
    if kind in ("gguf", "hf"):
        return formats.read(kind, path)
    if kind == "pth":
        sd = read_pth(path)
        for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1", "blocks.0.ffn.key.weight"):
            if key not in sd:
                raise CheckpointError(f"{path}: missing tensor {key!r}; is this an RWKV-7 (x070) checkpoint?")
        # layer 0 has no value residual: official files carry unused (or no) v0/v1/v2 there
        sd = {k: v for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}
        return sd, RWKVConfig.from_state_dict(sd).to_dict(), {"format": "official"}
    sd, meta = read_tagged(path, FORMAT, "a model checkpoint: a safetensors file without an rwkv_lm config in its "
                                         "metadata; write checkpoints with rwkv_lm.save")
    if "config" not in meta:
        raise CheckpointError(f"{path}: a safetensors file without an rwkv_lm config in its metadata; "
                              "write checkpoints with rwkv_lm.save")
    return sd, json.loads(meta["config"]), meta


def build(config: dict, *, initialize: bool = True):
    """A model for a config dict (as stored in a checkpoint), its modules' default initialization drawn from torch's
    random generator as usual (the trainer's `reset_parameters` then draws what it always drew); initialize=False
    leaves its tensors as allocated, for a caller that copies every one of them from a file next (nn.Linear's own
    initialization took 0.8-1.0 s of a 0.1B model's 2.2 s load, and grows with the model)."""
    config = dict(config)
    arch = config.pop("arch", "rwkv7")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[arch]
    if initialize:
        return model_cls(config_cls(**config))
    with _NoInit():
        return model_cls(config_cls(**config))


class _NoInit(TorchFunctionMode):
    """torch.nn.init's functions leave their tensor as it is. (Building on the meta device instead runs them
    through torch._refs, whose first use imports torch._dynamo: 1.1 s.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def copy_tensors(model, sd: dict[str, torch.Tensor], source) -> None:
    """Copy tensors into `model` by name, after checking that every name and shape fits."""
    check_tensors(model, sd, source)
    model.load_state_dict(sd)


def check_tensors(model, sd: dict[str, torch.Tensor], source) -> None:
    """A CheckpointError naming the first tensor of `sd` that `model` has not, or that it lacks, or whose shape
    differs from the model's."""
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
        if not v.is_floating_point() and v.dtype != expected[k].dtype:  # (int8 and int4 weights into their own)
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected floating point")


def open_model(path):
    """(an empty model for the file's config, with `model.tokenizer` and `model.metadata` set; the file's
    tensors), for a caller that prepares the model before the tensors go in (`rwkv_lm.load`)."""
    sd, config, meta = read(path)
    try:
        model = build(config, initialize=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not describe a model: {e}") from None
    model.metadata = meta
    model.tokenizer = _tokenizer(meta, config, path)
    return model, sd


def read_model(path, *, device="cpu", dtype=torch.float32):
    """The model in a file as model.py's modules (int8 weights dequantized), in eval mode: what the trainer and
    bit-exact tests take. `rwkv_lm.load` gives it prepared for fast inference."""
    model, sd = open_model(path)
    copy_tensors(model, dequantize(sd, path), path)
    return model.to(device=device, dtype=dtype).eval()


def dequantize(sd: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """The tensors with each int8 weight times its per-row scale and each int4 one (packed in uint8) times its
    group scales (as models prepared with weights "int8" or "int4" save them) as one fp32 weight, what
    model.py's Linear layers take."""
    quantized = (torch.int8, torch.uint8)
    scales = {k.removesuffix("weight") + "scale" for k, v in sd.items() if v.dtype in quantized}
    out = {k: v for k, v in sd.items() if k not in scales}
    for k, v in sd.items():
        if v.dtype in quantized:
            scale = sd.get(k.removesuffix("weight") + "scale")
            kind = "int8" if v.dtype == torch.int8 else "int4"
            shape = v.shape[:1] if kind == "int8" else (v.shape[0], 2 * v.shape[1] // INT4_GROUP)
            if not k.endswith(".weight") or scale is None or scale.shape != shape:
                raise CheckpointError(f"{source}: {kind} tensor {k!r} has no scale of shape {tuple(shape)} beside it; "
                                      f"write quantized models with rwkv_lm.save(rwkv_lm.runtime.prepare(model, "
                                      f"weights='{kind}'), path)")
            out[k] = v.float() * scale.float()[:, None] if kind == "int8" else dequantize_int4(v, scale)
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


def tokenizer_from(spec: str | os.PathLike):
    """A tokenizer from 'world', a tokenizer.json, or a model file of ours whose tokenizer to use (read from its
    metadata, no tensors loaded); ValueError saying which of them `spec` failed to be."""
    from .tokenizer import load_tokenizer

    path = Path(spec)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a model file of rwkv_lm, so no tokenizer to take from it")
        if "tokenizer" not in meta:
            raise CheckpointError(f"{path}: the model file carries no tokenizer; pass world or a tokenizer.json")
        return load_tokenizer(meta["tokenizer"])
    return load_tokenizer(spec)


def export_official(model, path, *, dtype=torch.bfloat16) -> Path:
    """Write an RWKV-7 in the official `.pth` layout (bf16 by default, as BlinkDL's files are; int8 and int4 weights
    dequantized: the official layout has no scales)."""
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in _float_tensors(model, "the official layout").items()}
    cfg = model.config
    # official files carry layer 0's (unused) value-residual tensors; zeros keep every loader happy
    sd["blocks.0.att.v0"] = torch.zeros(1, 1, cfg.n_embd, dtype=dtype)
    sd["blocks.0.att.v1"] = torch.zeros(cfg.n_embd, cfg.value_lora, dtype=dtype)
    sd["blocks.0.att.v2"] = torch.zeros(cfg.value_lora, cfg.n_embd, dtype=dtype)
    return atomic_write(path, lambda tmp: torch.save(sd, tmp))


def export_gguf(model, path, *, type: str = "f32", tokenizer=None) -> Path:
    """Write an RWKV-7 as GGUF for llama.cpp (rwkv_lm/formats/gguf.py). type: the big matrices' type, f32, f16,
    bf16, q8_0 or q4_0; tokenizer: defaults to model.tokenizer."""
    from .formats.gguf import write_gguf

    return write_gguf(_float_tensors(model, "GGUF"), model.config, path, type=type, tokenizer=_tokenizer_of(model, tokenizer))


def export_hf(model, folder, *, dtype=torch.float32, tokenizer=None) -> Path:
    """Write an RWKV-7 as a Hugging Face folder in the fla-hub layout (rwkv_lm/formats/hf.py)."""
    from .formats.hf import write_hf

    return write_hf(_float_tensors(model, "a Hugging Face folder"), model.config, folder, dtype=dtype,
                    tokenizer=_tokenizer_of(model, tokenizer))


def _float_tensors(model, what: str) -> dict[str, torch.Tensor]:
    """An RWKV-7's tensors, int8 weights dequantized (an optimize(weights="int8") model exports what it computes)."""
    if not isinstance(model, RWKV):
        raise CheckpointError(f"only RWKV-7 models can be written as {what}, not {model.__class__.__name__}")
    return dequantize(model.state_dict(), "the model")


def _tokenizer_of(model, tokenizer):
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
