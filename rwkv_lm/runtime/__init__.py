"""Making a model ready for inference where it runs: the one seam between the model (model.py, the reference
every backend is tested against) and the fast paths.

    model = rwkv_lm.load(path, device="cpu", weights="int8")   # read the file, then prepare
    model = prepare(plain_model, device="cuda", weights="bf16")
    step = decode_step(model, graphs=True)                     # what an Engine steps its batch with

- CPU (`cpu.py`): bias-free Linear layers become `KernelLinear` (fp32, bf16, int8 or int4 weights streamed by the C
  kernels of `rwkv_lm/ops/cpu_kernels.c`) and each block a `StepBlock` (a decode step or a short prompt of a
  block in one C call), the model a `StepRWKV` (a decode step, embedding to logits, in one C call); `isa` caps the
  kernels' instruction-set level.
- GPU: the model in `weights`' dtype (fp32 or bf16); its batched decode step is model.step, or with
  `graphs=True` the fused CUDA step (`cuda_step.py`) replayed as CUDA graphs (`cuda_graphs.py`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..checkpoint import check_tensors, copy_tensors, dequantize, open_model, read_model
from ..files import CheckpointError
from ..model import RWKV
from .cpu import optimize
from .cuda_graphs import decode_step

WEIGHTS = ("fp32", "bf16", "int8", "int4")  # how the Linear weights are stored
QUANTIZED = {torch.int8: "int8", torch.uint8: "int4"}  # CPU-only weights, by their stored dtype (int4: packed in uint8)
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

__all__ = ["WEIGHTS", "decode_step", "load", "prepare"]


def _check(device, weights) -> torch.device:
    device = torch.device(device)
    if weights not in (None, *WEIGHTS):
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)} (or None: as stored), got {weights!r}")
    if device.type == "cuda" and weights in QUANTIZED.values():
        raise ValueError(f"{weights} weights run on the CPU only; use device='cpu', or weights='bf16' on a GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: only cpu and cuda are supported")
    return device


def prepare(model, *, device="cpu", weights: str | None = None, isa: str | None = None):
    """`model` ready for inference on `device` (in place where it can be; returns it), in eval mode, no
    parameter requiring grad. weights: "fp32", "bf16", "int8" or "int4" (CPU only); None keeps them as they are (on a GPU:
    fp32). isa: on a CPU, the highest kernel level to use (`rwkv_lm.ops.cpu_kernels.LEVELS`; default: the
    best this CPU has, or the cap RWKV_LM_CPU_ISA sets)."""
    device = _check(device, weights)
    if device.type == "cuda":
        return model.to(device=device, dtype=GPU_DTYPES[weights or "fp32"]).requires_grad_(False).eval()
    return optimize(model.to("cpu"), weights=None if weights == "fp32" else weights, isa=isa)


def _prepared_from(model: RWKV, sd: dict[str, torch.Tensor], weights: str | None, isa: str | None, path) -> None:
    """The file's float tensors into an empty RWKV-7 on the CPU: each Linear weight straight into the layout its
    kernel streams (panels, or quantized in quads), so the model is never whole in fp32 beside its prepared form; the
    other tensors copied. (bench/RESULTS.md, "Loading a model".)"""
    check_tensors(model, sd, path)
    names, into, widen = {module: prefix for prefix, module in model.named_modules()}, set(), weights in (None, "fp32")
    # fp32 panels take fp32: a narrower file's weights are widened a block at a time, just before that block is
    # prepared (all at once, their copies and the panels had been whole side by side); the others keep the file's
    # dtype, as they are quantized or rounded anyway
    for part in [*model.blocks, model] if widen else [model]:
        for module in part.modules():
            if type(module) is nn.Linear and module.bias is None:
                given = sd[names[module] + ".weight"]
                module.weight = nn.Parameter(given.float() if widen else given, requires_grad=False)
                into.add(names[module] + ".weight")
        # (before the other tensors are copied, though `prepare` runs optimize again after: leaving the conversion
        # to it alone raised the peak of a 0.1B official .pth loaded in int8 from 953 to 1,099 MB, a 454M one's
        # from 1,932 to 2,228)
        optimize(part, weights=None if weights == "fp32" else weights, isa=isa)
    # (not strict: the Linears' weights, and the scales made with them, are in; check_tensors checked the names)
    model.load_state_dict({k: v for k, v in sd.items() if k not in into}, strict=False)


def load(path, *, device="cpu", weights: str | None = None, dtype: torch.dtype = torch.float32, fast: bool = True,
         isa: str | None = None):
    """A model from a file (ours, an official RWKV-7 `.pth`), in eval mode, with `model.tokenizer` (the one the
    file names; World for official 65,536-token files; else None).

    fast (the default): prepared for inference by `prepare(device, weights, isa)`; int8 and int4 weights in the
    file stay as they are (unless `weights` says otherwise; a `dtype` other than fp32 gives the plain model in it).
    fast=False: model.py's modules as they are, in `dtype` (int8 and int4 weights dequantized), for training and
    bit-exact comparisons."""
    if not fast:
        return read_model(path, device=device, dtype=dtype)
    device = _check(device, weights)
    model, sd = open_model(path)
    stored = {QUANTIZED[v.dtype] for v in sd.values() if v.dtype in QUANTIZED}
    if len(stored) > 1:
        raise CheckpointError(f"{path}: holds both int8 and int4 (uint8) weights; a model has one kind")
    on_cpu = device.type == "cpu" and isinstance(model, RWKV) and dtype == torch.float32
    if stored and on_cpu and weights in (None, *stored):
        optimize(model, weights=stored.pop(), isa=isa)  # the quantized layers the file's tensors go into
        copy_tensors(model, sd, path)
    elif on_cpu:
        _prepared_from(model, dequantize(sd, path), weights, isa, path)
    else:
        copy_tensors(model, dequantize(sd, path), path)
    del sd  # (the file's tensors, before prepare makes the weights' new copies)
    if device.type == "cpu" and dtype != torch.float32:  # a plain model in another dtype: nothing to prepare
        return model.to(dtype=dtype).requires_grad_(False).eval()
    return prepare(model, device=device, weights=weights, isa=isa)
