"""The CPU path of `rwkv_lm.runtime.prepare`: a model made fast for inference on a CPU without changing its
parameter names or what it computes.

One-token steps are matrix-vector products, bound by how fast the weights stream from memory, so the
weights' width and the way they are read matter more than the model code. `optimize` swaps every bias-free
Linear for a `KernelLinear` (same `weight` name) whose decode steps run in small C kernels
(`rwkv_lm/ops/cpu_kernels.c`, compiled at first use for the instruction-set level chosen here) that stream each
weight once per step; inputs of more than one token a row and more than MAX_DECODE_ROWS rows go through torch's
matmul, but for weights in panels or quads (below), which the kernels take at any count. A one-token step of a
block runs in one C call (`StepBlock`: norms, mixes, LoRAs, recurrence, products; batches wider than 16 sequences
in slices), and a one-token step of the model, or a prompt that wants only its
last token's logits (`last_only`), runs in one C call from its embedding to its logits (`StepRWKV`; a longer prompt
in pieces of MAX_DECODE_ROWS rows, the state carried; ln_out is a `KernelLayerNorm`, so prompts normalize as steps
do); a prompt with every position's logits runs each block in one C call (each token a row; in pieces as above);
anything under autograd runs model.py's code. (The WKV-7 recurrence has its own C kernel for CPU
inference in ops/wkv7/cpu.py, used by every model.)

Batch invariance: the kernels compute each row of a product by the same operations in the same order whatever
the number of rows, so a decode step's logits for a sequence are bit for bit those it gets alone, in any batch,
and a prompt read in pieces gives the bits of one read (the serving engine splits prompts by its budget and
cache). The head's rows of one token each (steps, `last_only`) therefore take the kernels at any batch size.
- fp32 (the default): the weights keep their values, stored in panels (`to_panels`: [ceil(out / 64), in, 64], each
  output the in-order sum of multiply-add chains over 16 inputs each, no sums across a register's lanes);
  checkpoints and state_dict() hold them as [out, in] (a copy of each: saving needs that much memory again);
- bf16 weights (`weights="bf16"`): Linear weights are kept in bf16 (half the bytes) and multiply their inputs
  rounded to bf16 (as llama.cpp's BF16 and torch's bf16 matmul do), with fp32 sums; the LoRAs (below) in bf16 too;
  everything else stays fp32.
  A step widens both to fp32 in registers (with avx512_bf16: feeds them to its dot product, twice the products
  of an FMA; with AMX: to its tiles, 16 rows of W by up to 16 of x an instruction), and so does a prompt; every
  level rounds alike. Where neither takes them the weights are stored in panels as fp32 ones are (`to_panels`; the
  same blocks and chains, each vector of W widened in registers): one sequential stream where rows are four (0.1B
  bf16 decode 1.23-1.26x as fast on an AVX2 Zen 2, bench/RESULTS.md, issue 20's sixteenth pass).
- int8 weights (`weights="int8"`): a quarter of the bytes, one fp32 scale per output row; steps widen them to
  fp32 in registers, prompts too (but at the x86 levels from avx2, below); torch ops multiply the dequantized
  weights. `rwkv_lm.save` keeps them as they are. Where integer products take them (below; not on AMX's tiles)
  they are stored in quads (`to_quads`: four inputs of 16 rows a 64-byte vector), which one vpdpbusd (AVX2:
  vpmaddubsw and vpmaddwd on each half) takes against four inputs of x: with VNNI 33-token int8 prompts 1.5x as
  fast as row-major, at one thread and two (bench/RESULTS.md, issue 20's thirteenth pass); checkpoints hold them
  [out, in].
- int4 weights (`weights="int4"`): two to a byte (stored as uint8), one fp32 scale per INT4_GROUP inputs of a
  row (0.5625 bytes a weight); the kernels dequantize them in registers, as int8. Inputs of every Linear must be
  a multiple of INT4_GROUP wide. Where integer products take them they are stored in quads too (`to_int4_quads`).
- bf16, int4 and int8 models keep the time mix's LoRAs (the small low-rank matrices x @ w1 ... feeds) in bf16 and
  int8 (one scale per output) too: the Parameters are rounded to those values (model.py multiplies them), the C
  step reads bf16 or int8 copies of them against fp32 inputs, made again after a LoRA changes (int8: a fifth of a
  0.1B int4 step's bytes before, 97 -> 82 MB a token; bf16: 292 -> 282 MB; the default model's bits per byte
  unchanged, bench/RESULTS.md).
- int4 and int8 at the x86 levels from avx2 (avx2, avx512, avx512_vnni, avx512_bf16, amx): their Linear products
  round the activations to int8, one scale per ACT_GROUP inputs (`round_activations`), and multiply in integers
  (vpdpbusd with VNNI, vpmaddubsw and vpmaddwd without; int8 at the amx level on AMX's tiles; each group's exact sum
  then one fp32 chain per output, so the levels that take quads give the same bits), several times fewer
  instructions than widening the weights; torch's matmul rounds them alike where it runs (autograd aside), so every
  path gives the same logits. The other levels keep fp32 activations.
Without a C compiler the kernels are missing (one warning): fp32 weights are then only stored column-major
([in, out] in memory, viewed as the usual [out, in]), which lets BLAS read them in one pass.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import DECAY_SCALE, RWKV, Block
from ..ops.cpu_kernels import (ACT_GROUP, BLOCK_STEP_PARAMS, INT4_BLOCK, INT4_GROUP, PANEL, QUAD_ROWS, ROWS_PER_PASS,
                               WEIGHT_TYPES, dequantize_int4, isa_level, kernels, round_activations)
from ..state import LayerState, RWKVState

# rows of several tokens a KernelLinear takes in the C kernels (one pass over the weights; rows of one token each,
# a step's or a last_only head's, and weights in panels or quads it takes at any count), and the rows of a prompt's
# piece in a StepBlock or StepRWKV call; beyond, torch's matmul on row-major weights is as fast (measured)
MAX_DECODE_ROWS = ROWS_PER_PASS
LORA_PARAMS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")  # [in, out], as the C step reads them (`gemv_cols`)
# the kernel of an [out, in] weight stored row-major, by dtype (fp32 KernelLinear weights are in panels, bf16 ones
# where no bf16 dot product takes them row-major, and int8 and int4 ones at the x86 levels from avx2 in quads:
# `_gemv_kernel`)
KERNEL_OF = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16", torch.int8: "gemv_i8", torch.uint8: "gemv_i4"}
PANEL_KERNEL_OF = {torch.float32: "gemv_f32_panels", torch.bfloat16: "gemv_bf16_panels"}
SCALED_KERNELS = ("gemv_i8", "gemv_i4", "gemv_i8_quads", "gemv_i4_quads")  # those whose weights have scales beside them
# optimize()'s choices: the Linear weights' dtype (int4: packed two to a uint8)
WEIGHTS = {None: None, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}


def _gemv_kernel(weight: torch.Tensor) -> str | None:
    """The kernel that multiplies by this weight: an [out, in] one stored row-major (a weight assigned after
    optimize() may not be), fp32 or bf16 in panels (`to_panels`), int8 or int4 in quads (`to_quads`, `to_int4_quads`);
    else None."""
    if weight.dim() == 3:
        return PANEL_KERNEL_OF.get(weight.dtype) if weight.shape[2] == PANEL and weight.is_contiguous() else None
    if weight.dim() in (4, 5):
        quads = weight.dtype == torch.uint8 and weight.shape[-2:] == (QUAD_ROWS, 4) and weight.is_contiguous()
        return ("gemv_i8_quads" if weight.dim() == 4 else "gemv_i4_quads") if quads else None
    return KERNEL_OF.get(weight.dtype) if weight.stride() == (weight.shape[1], 1) else None


def _weight_type(weight: torch.Tensor) -> int:
    """The C enum (WEIGHT_TYPES) of a weight `_gemv_kernel` finds a kernel for."""
    dtype = str(weight.dtype).removeprefix("torch.")
    return WEIGHT_TYPES[{3: f"{dtype}_panels", 4: "int8_quads", 5: "int4_quads"}.get(weight.dim(), dtype)]


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """fp32 or bf16 weight [out, in] -> [ceil(out / PANEL), in, PANEL] of its dtype, the layout gemv_f32_panels and
    gemv_bf16_panels stream: each panel's PANEL outputs at an input side by side (the last panel's missing rows zero)."""
    out, in_features = weight.shape
    panels = -(-out // PANEL)
    padded = F.pad(weight, (0, 0, 0, panels * PANEL - out))
    return padded.reshape(panels, PANEL, in_features).transpose(1, 2).contiguous()


def from_panels(panels: torch.Tensor, out: int) -> torch.Tensor:
    """`to_panels` undone: the [out, in] weight, a contiguous copy (differentiable, so gradients reach the panels)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out].contiguous()


def to_quads(weight: torch.Tensor) -> torch.Tensor:
    """int8 weight [out, in] (in a multiple of 4) -> uint8 [ceil(out / QUAD_ROWS), in / 4, QUAD_ROWS, 4] of w + 128,
    the layout the integer products stream (cpu_kernels.c's tile_quads): each 64 bytes four consecutive inputs of
    QUAD_ROWS rows (the last block's missing rows w = 0)."""
    out, in_features = weight.shape
    blocks = -(-out // QUAD_ROWS)
    padded = F.pad(weight.to(torch.int16) + 128, (0, 0, 0, blocks * QUAD_ROWS - out), value=128).to(torch.uint8)
    return padded.reshape(blocks, QUAD_ROWS, in_features // 4, 4).transpose(1, 2).contiguous()


def from_quads(quads: torch.Tensor, out: int) -> torch.Tensor:
    """`to_quads` undone: the int8 weight [out, in]."""
    rows = quads.transpose(1, 2).reshape(-1, quads.shape[1] * 4)[:out]
    return (rows.to(torch.int16) - 128).to(torch.int8)


def to_int4_quads(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int4's (packed [out, in / 2], scale [out, in / INT4_GROUP]) -> (uint8 [ceil(out / QUAD_ROWS), in /
    INT4_GROUP, 8, QUAD_ROWS, 4], fp32 [ceil(out / QUAD_ROWS), in / INT4_GROUP, QUAD_ROWS]), the layout the integer
    products stream (cpu_kernels.c's tile_quads): each 64 bytes four consecutive inputs of QUAD_ROWS rows in their low
    nibbles and the four 32 inputs on in their high ones, each group's scales of QUAD_ROWS rows side by side (the
    last block's missing rows w = 0)."""
    out, groups = scale.shape
    blocks = -(-out // QUAD_ROWS)
    halves = packed.reshape(out, -1, INT4_BLOCK // 2)
    nibbles = F.pad(torch.cat([halves & 15, halves >> 4], -1).reshape(out, -1), (0, 0, 0, blocks * QUAD_ROWS - out), value=8)
    by_group = nibbles.reshape(blocks, QUAD_ROWS, groups, 2, INT4_GROUP // 8, 4)  # [.., g, h, j, m]: 64 g + 32 h + 4 j + m
    quads = (by_group[:, :, :, 0] | by_group[:, :, :, 1] << 4).permute(0, 2, 3, 1, 4).contiguous()
    scales = F.pad(scale, (0, 0, 0, blocks * QUAD_ROWS - out), value=1.0).reshape(blocks, QUAD_ROWS, groups)
    return quads, scales.transpose(1, 2).contiguous()


def from_int4_quads(quads: torch.Tensor, scales: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_int4_quads` undone: quantize_int4's (packed [out, in / 2], scale [out, in / INT4_GROUP])."""
    blocks, groups = quads.shape[:2]
    by_group = quads.permute(0, 3, 1, 2, 4)  # [blocks, rows, g, j, m]
    nibbles = torch.stack([by_group & 15, by_group >> 4], 3).reshape(blocks * QUAD_ROWS, -1)[:out]
    halves = nibbles.reshape(out, -1, 2, INT4_BLOCK // 2)
    packed = (halves[:, :, 0] | halves[:, :, 1] << 4).reshape(out, -1)
    return packed, scales.transpose(1, 2).reshape(-1, groups)[:out].contiguous()


QUANTIZE_ROWS = 4096  # rows a quantizer takes at a time


def _by_rows(quantize):
    """`quantize` (whose rows are independent) applied QUANTIZE_ROWS rows at a time, the same values: its fp32
    temporaries are then a few MB, not up to three times the weight at once (a 0.1B head's ~600 MB; loading that
    model in int8 1.16 -> 1.00 s)."""
    @functools.wraps(quantize)
    def by_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if weight.shape[0] <= QUANTIZE_ROWS:
            return quantize(weight)
        return tuple(map(torch.cat, zip(*map(quantize, weight.split(QUANTIZE_ROWS)))))
    return by_rows


@_by_rows
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], fp32 scale [out]) with weight ~= int8 * scale per row: each row's
    largest magnitude maps to 127, so the rounding error is at most half a step of that row's own scale."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp_min(1e-30) / 127  # (an all-zero row: any scale, its values are 0)
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


@_by_rows
def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (in a multiple of INT4_GROUP) -> (packed uint8 [out, in / 2], fp32 scale [out, in / INT4_GROUP])
    with weight ~= (nibble - 8) * scale per group. A group's value of largest magnitude maps to -8 exactly, so all 16
    levels are used (on the demo model, group 64: top token = fp32's at 90.4% of positions, 88.9% for max/7's 15 levels)."""
    out, in_features = weight.shape
    if in_features % INT4_GROUP:
        raise ValueError(f"int4 weights need inputs a multiple of {INT4_GROUP} wide, got a [{out}, {in_features}] "
                         "weight; use weights='int8' for this model")
    groups = weight.float().reshape(out, in_features // INT4_GROUP, INT4_GROUP)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))  # signed
    scale = extreme / -8
    scale = torch.where(scale == 0, 1.0, scale)  # (an all-zero group: any scale, its values are 0)
    nibbles = (torch.round(groups / scale).clamp_(-8, 7) + 8).to(torch.uint8).reshape(out, -1, 2, INT4_BLOCK // 2)
    return (nibbles[:, :, 0] | nibbles[:, :, 1] << 4).reshape(out, in_features // 2), scale.squeeze(-1)




# the quantizer of each quantized weight dtype (int4: packed in uint8)
QUANTIZERS = {torch.int8: quantize_int8, torch.uint8: quantize_int4}

HUGE_PAGE = 2 << 20  # bytes: a transparent huge page on x86-64 (and on aarch64 with 4 KiB base pages)


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of t in memory Linux is asked to back with huge pages (madvise MADV_HUGEPAGE, whole 2 MiB pages from
    a 2 MiB boundary), or t itself where it is under one page or the system has no such advice. A weight streamed
    once a token then costs a TLB entry per 2 MiB, not per 4 KiB: one core reading a 0.1B block's 3072 x 768 fp32
    key for one row of x took 0.65 ms on them against 0.75 (bench/RESULTS.md, issue 20's ninth pass)."""
    if t.nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    pages = -(-t.nbytes // HUGE_PAGE) * HUGE_PAGE
    # anonymous and private (Linux gives shared memory no huge pages), page-aligned: room to start on a 2 MiB boundary
    memory = mmap.mmap(-1, pages + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(memory)) % HUGE_PAGE
    try:
        memory.madvise(mmap.MADV_HUGEPAGE, start, pages)
    except OSError:  # (a kernel without transparent huge pages)
        return t
    # (the tensor holds the mmap alive; its storage is its own bytes alone, so copies and pickles carry no slack)
    placed = torch.frombuffer(memory, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)
    return placed.copy_(t)


class KernelLinear(nn.Linear):
    """A bias-free Linear (fp32, bf16, int8 or int4 weight; fp32 activations, rounded as the module docstring says)
    whose decode steps run in a C kernel.

    The weight keeps its name and is stored in the order the kernels stream it: fp32 in panels ([ceil(out / PANEL),
    in, PANEL], `to_panels`), bf16 too where no bf16 dot product takes it row-major, int8 and int4 in quads where
    integer products take them (`to_quads`, `to_int4_quads`, their scales with them), the others row-major. int8
    weights have one fp32 `scale` per output row beside them (a buffer, saved with the model), int4 weights (packed,
    [out, in / 2] uint8) one per group of INT4_GROUP inputs ([out, in / INT4_GROUP]): state_dict() gives and takes
    them so, and fp32 and bf16 as [out, in], whatever the layout (`dense_weight()` makes any of them a float
    [out, in]). Still an nn.Linear, so what adapts Linear layers (rwkv_lm.lora) adapts it too. quads=False keeps int8 and
    int4 row-major (`optimize`'s choice for a model with a width no multiple of ACT_GROUP, whose blocks' C steps
    take one weight type).
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, isa: str | None = None, quads: bool = True):
        nn.Module.__init__(self)
        self.isa = isa_level(isa)  # the kernels' instruction-set level, chosen once, when the layer is made
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.dense_weight() if isinstance(linear, KernelLinear) else linear.weight.detach()
        scale = None
        if dtype in QUANTIZERS:
            weight, scale = QUANTIZERS[dtype](weight)
        # panels on huge pages too: 0.1B fp32 decode 1.11x (1 thread) and 1.14x (2), bf16 in panels 1.07-1.09x
        # (AVX2); int4 was 0.92-0.96x there and row-major bf16 and int8 level, so only panels move (bench/RESULTS.md,
        # issue 20's ninth and sixteenth passes)
        if dtype == torch.float32:
            weight = on_huge_pages(to_panels(weight.float()))
        elif dtype == torch.bfloat16 and getattr(kernels(self.isa), "bf16_panels", False):
            weight = on_huge_pages(to_panels(weight.to(dtype)))
        elif dtype == torch.int8 and quads and self._quads_here(dtype):
            weight = to_quads(weight)
        elif dtype == torch.uint8 and quads and self._quads_here(dtype):
            weight, scale = to_int4_quads(weight, scale)
        else:  # (a copy even where the dtype is the same: never the given Linear's memory, which may be a file's
            # mapped tensor, rwkv_lm.load's)
            weight = weight.to(dtype, copy=True).contiguous()
        self.weight = nn.Parameter(weight, requires_grad=False)
        if scale is not None:
            self.register_buffer("scale", scale)
        self.bias = None

    def _quads_here(self, dtype: torch.dtype) -> bool:
        """Whether this layer's int8 or int4 weight goes into quads: where its level's integer products take them."""
        here = "int8_quads" if dtype == torch.int8 else "int4_quads"
        return self.in_features % ACT_GROUP == 0 and getattr(kernels(self.isa), here, False)

    @property
    def weights(self) -> torch.dtype:
        """What the weight is stored as, whatever the layout (`optimize`'s choice): fp32, bf16, int8 or int4 (uint8)."""
        return torch.int8 if self.weight.dim() == 4 else self.weight.dtype

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The weight (and scale) as a checkpoint holds them: fp32 and bf16 [out, in] out of their panels, int8 [out, in]
        and int4 [out, in / 2] (with [out, in / INT4_GROUP] scales) out of their quads; else as stored."""
        if self.weight.dim() == 3:
            return {"weight": from_panels(self.weight, self.out_features)}
        if self.weight.dim() == 4:
            return {"weight": from_quads(self.weight, self.out_features), "scale": self.scale}
        if self.weight.dim() == 5:
            return dict(zip(("weight", "scale"), from_int4_quads(self.weight, self.scale, self.out_features)))
        return {"weight": self.weight, **({"scale": self.scale} if "scale" in self._buffers else {})}

    def dense_weight(self) -> torch.Tensor:
        """The weight as a float tensor [out, in] (int8 and int4 times their scales, fp32 and bf16 out of their
        panels)."""
        stored = self._checkpoint_tensors()
        weight = stored["weight"]
        if weight.dtype == torch.uint8:
            return dequantize_int4(weight, stored["scale"])
        if weight.dtype == torch.int8:
            return weight.to(stored["scale"].dtype) * stored["scale"][:, None]
        return weight

    # a checkpoint holds fp32, bf16, int8 and int4 weights as [out, in] (int4: [out, in / 2]), whatever layout the
    # kernels read them in
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.dim() > 2:
            for name, tensor in self._checkpoint_tensors().items():
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A float [out, in] weight goes in as this layer stores it: fp32 and bf16 into panels, int8 and int4 quantized
        (their scales with them; a merged LoRA, say), into quads where they are stored so. Stored int8 and int4
        weights go in as they are (into quads too)."""
        key, scale_key = prefix + "weight", prefix + "scale"
        given = state_dict.get(key)
        shape = (self.out_features, self.in_features)
        stored = shape if self.weights != torch.uint8 else (self.out_features, self.in_features // 2)
        if self.weight.dim() > 2 and isinstance(given, torch.Tensor) and given.shape not in (shape, stored, self.weight.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(given.shape)} into a weight "
                              f"of shape {stored}")
            return
        if isinstance(given, torch.Tensor) and given.is_floating_point() and given.shape == shape:
            given = given.detach()
            if self.weight.dim() == 3:  # (copied into the weight, or with assign=True the weight)
                panels = to_panels(given.to(self.weight.dtype))
                state_dict[key] = on_huge_pages(panels) if local_metadata.get("assign_to_params_buffers") else panels
            elif self.weights in QUANTIZERS:
                given, state_dict[scale_key] = QUANTIZERS[self.weights](given)
                state_dict[key] = given
        if self.weight.dim() > 3 and isinstance(given, torch.Tensor) and given.dtype == self.weights and given.shape == stored:
            if self.weight.dim() == 4:
                state_dict[key] = to_quads(given)
            elif (isinstance(state_dict.get(scale_key), torch.Tensor)
                  and state_dict[scale_key].shape == (self.out_features, self.in_features // INT4_GROUP)):
                state_dict[key], state_dict[scale_key] = to_int4_quads(given, state_dict[scale_key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _rounds_activations(self) -> bool:
        """Whether this layer's kernel quantizes its inputs to int8: int8 weights and int4 ones in quads, at a level
        with integer products (x86 from avx2; row-major int4, a weight assigned after optimize(), goes to the kernel
        that widens it)."""
        return ((self.weights == torch.int8 or self.weight.dim() == 5) and self.in_features % ACT_GROUP == 0
                and getattr(kernels(self.isa), "int8_activations", False))

    def forward(self, x):
        rows = x.numel() // self.in_features
        # chosen at each call: .to() may have changed the weight's dtype or device since optimize()
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)  # (the kernels have no backward)
        one_token_rows = x.dim() <= 2 or x.shape[-2] == 1  # steps, last_only heads: the kernels at any batch (invariance)
        # weights in panels or quads take the kernel at any count: torch would need them unpacked first (a 0.1B
        # head's 65 rows: 99 ms that way against 24 in the kernel; row-major, torch took 29)
        fits = (self.weight.device.type == "cpu" and (rows <= MAX_DECODE_ROWS or one_token_rows or self.weight.dim() > 2)
                and not wants_grad)
        kernel = _gemv_kernel(self.weight) if fits else None
        quantized = kernel in SCALED_KERNELS
        if kernel not in kernels(self.isa) or quantized and self.scale.dtype != torch.float32:
            weight = self.dense_weight()  # a prompt's rows: torch's matmul, int8 and int4 weights dequantized for it
            if self._rounds_activations() and not wants_grad:  # what the kernels would multiply (same logits)
                x = round_activations(x, weight.dtype)
            return F.linear(x.to(weight.dtype), weight).to(x.dtype)
        x_rows = x.reshape(rows, self.in_features).float().contiguous()
        y = torch.empty(rows, self.out_features)
        scale = (self.scale.data_ptr(),) if quantized else ()
        if kernels(self.isa)[kernel](self.weight.data_ptr(), *scale, x_rows.data_ptr(), y.data_ptr(), self.out_features,
                             self.in_features, rows, torch.get_num_threads()):
            raise RuntimeError(f"{kernel} could not allocate its buffer for a [{rows}, {self.in_features}] input")
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class KernelLayerNorm(nn.LayerNorm):
    """The model's last LayerNorm (ln_out) in the C kernels (`layer_norm`), the operations the one-call step
    (`StepRWKV`) runs it by, so a token stepped and the same token at the end of a prompt get the same logits, bit
    for bit. Anything the kernel does not take (autograd, another dtype or device) runs nn.LayerNorm's."""

    isa: str  # the kernels' level, set where the module is made one

    def forward(self, x):
        weight, bias, n = self.weight, self.bias, self.normalized_shape[-1]
        params = (weight, bias)
        if (x.dtype != torch.float32 or x.device.type != "cpu" or len(self.normalized_shape) != 1 or n % 16
                or not all(p is not None and p.dtype == torch.float32 and p.is_contiguous() for p in params)
                or torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
                or "layer_norm" not in kernels(self.isa)):
            return super().forward(x)
        x = x.contiguous()
        out = torch.empty_like(x)
        kernels(self.isa)["layer_norm"](x.data_ptr(), out.data_ptr(), weight.data_ptr(), bias.data_ptr(), x.numel() // n,
                                        n, self.eps, torch.get_num_threads())
        return out


def _c_reads(state: LayerState, B: int, C: int, H: int, N: int) -> bool:
    """Whether a layer's state is what the C step reads it as: fp32 on the CPU, [B, C] shifts and a [B, H, N, N]
    wkv (the C would read another shape past its end)."""
    return (state.att_shift.shape == (B, C) and state.ffn_shift.shape == (B, C) and state.wkv.shape == (B, H, N, N)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (state.att_shift, state.wkv, state.ffn_shift)))


@dataclass
class StepPlan:
    """What a block's C step was prepared for (by `_fused_steps`), and the pointer array it last built."""

    isa: str  # the level of the kernels
    slots: list[int]  # where each tensor the block has goes among BLOCK_STEP_PARAMS (absent ones are NULL)
    tree: list[tuple]  # (parent, name, child) of every submodule: a replaced one sends the block to model.py
    modules: tuple  # the block's modules, whose hooks the C would skip
    sources: list[tuple]  # (the dict that holds it, its name) for each tensor the C step takes
    dtypes: list[torch.dtype]  # the tensors' dtypes and strides then (all contiguous)
    strides: list[tuple]
    sizes: tuple  # C, head size, ffn width and the four LoRA ranks
    weight_type: int  # WEIGHT_TYPES of the Linear weights
    # where the LoRA matrices are among `sources` when the Linear weights are bf16, int8 or int4 (the C step reads
    # copies of them, `_lora_copy`: bf16 for bf16 weights, int8 for the other two)
    rounded_loras: list[int]
    key: list | None = None  # (id, address, dtype, stride, version) of each tensor when `params` was built
    params: object | None = None  # the ctypes array of pointers for those tensors
    lora_copies: list | None = None  # the LoRAs' copies `params` points to: (weight, int8's scale or None) each

    def __getstate__(self):  # (copy.deepcopy and pickle): the cached pointers are into the original's memory
        return {**self.__dict__, "key": None, "params": None, "lora_copies": None}


class StepBlock(Block):
    """Block whose one-token steps and prompts run in C calls (`block_step`): model.py's arithmetic without the
    ~130 small torch ops per layer that took a quarter of a batched step, a third of a one-row step and most of a
    short prompt on a small model. Anything else (autograd, or a dtype that .to() changed since optimize()) runs
    Block.forward."""

    step_plan: StepPlan

    def forward(self, x, v_first, state: LayerState):
        fp32, (B, T, C) = torch.float32, x.shape
        att, plan = self.att, self.step_plan
        H, N = att.n_head, att.head_size
        current = self._step_tensors()
        if current is None:  # a module replaced since optimize() (an adapter, say)
            return super().forward(x, v_first, state)
        params = self._step_params(current)
        if (params is None or x.dtype != fp32 or x.device.type != "cpu"
                or torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in current))
                or "block_step" not in kernels(plan.isa)
                or any(m._forward_hooks or m._forward_pre_hooks for m in plan.modules)  # the C would skip them
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or not _c_reads(state, B, C, H, N)):
            return super().forward(x, v_first, state)  # training, or anything changed
        # a longer prompt in pieces of up to MAX_DECODE_ROWS rows, the state carried: against model.py's ops and
        # torch's matmul, fp32 128 tokens 1.8x faster, 512 1.4x; int8 (dequantized there) 2.7x and 1.8x
        chunk = max(1, MAX_DECODE_ROWS // B)
        pieces = []
        for i in range(0, T, chunk):  # each piece starts from the state the one before it ends in
            pieces.append(self._fused(params, x[:, i:i + chunk], None if att.layer_id == 0 else v_first[:, i:i + chunk], state))
            state = pieces[-1][2]
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 1), pieces[-1][2]

    def _fused(self, params, x, v_first, state: LayerState):
        """One C call of block_step for x [B, T, C] from this state: (x_out, v_first, new state)."""
        (B, T, C), att, plan = x.shape, self.att, self.step_plan
        x_out, att_shift, ffn_shift, wkv = (torch.empty(B, T, C), torch.empty(B, C), torch.empty(B, C),
                                            torch.empty(B, att.n_head, att.head_size, att.head_size))
        v_first = torch.empty(B, T, C) if v_first is None else v_first.contiguous()
        inputs = (x.contiguous(), state.att_shift.contiguous(), state.wkv.contiguous(), state.ffn_shift.contiguous())
        if kernels(plan.isa)["block_step"](params, inputs[0].data_ptr(), x_out.data_ptr(), v_first.data_ptr(),
                                           *(t.data_ptr() for t in inputs[1:]), att_shift.data_ptr(), wkv.data_ptr(),
                                           ffn_shift.data_ptr(), B, T, *plan.sizes, self.ln1.eps, att.ln_x.eps,
                                           DECAY_SCALE, plan.weight_type, torch.get_num_threads()):
            raise RuntimeError(f"block_step could not allocate its buffers for a batch of {B}")
        return x_out, v_first, LayerState(att_shift, wkv, ffn_shift)

    def _step_tensors(self):
        """The tensors the C step takes, as they are now (load_state_dict(assign=True) replaces them), or None
        where a submodule was replaced since optimize(). Read from the modules' own dicts: through nn.Module's
        __getattr__ the ~40 lookups cost 40 us a block."""
        plan = self.step_plan
        if not all(parent._modules.get(key) is child for parent, key, child in plan.tree):
            return None
        try:
            return [tensors[name] for tensors, name in plan.sources]
        except KeyError:  # a parameter deleted
            return None

    def _step_params(self, current):
        """The C step's array of parameter pointers for these tensors, or None where they are no longer in the
        dtypes, device and layouts optimize() prepared. Kept while the same tensors hold the same memory in the
        same layout and nothing wrote to them, so a step does not check ~40 tensors again (with the lookups above:
        54 -> 18 us of Python a block, 27 with the layout checked too). With bf16, int8 or int4 weights the LoRAs go
        in as copies in bf16 or int8 (`_lora_copy`), made again whenever a LoRA changes."""
        plan = self.step_plan
        key = _tensors_key(current)
        if key == plan.key:
            return plan.params
        plan.key = plan.params = plan.lora_copies = None
        if not all(p.dtype == dtype and p.device.type == "cpu" and p.stride() == stride
                   for p, dtype, stride in zip(current, plan.dtypes, plan.strides)):
            return None
        loras = [current[i] for i in plan.rounded_loras]
        if any(p.requires_grad for p in loras):  # being trained: rounding them would fight the optimizer
            return None
        pointers = [None] * len(BLOCK_STEP_PARAMS)
        for slot, p in zip(plan.slots, current):
            pointers[slot] = p.data_ptr()
        plan.lora_copies = [_lora_copy(p, plan.weight_type) for p in loras]
        for i, (weight, scale) in zip(plan.rounded_loras, plan.lora_copies):
            slot = plan.slots[i]
            pointers[slot] = weight.data_ptr()
            if scale is not None:
                pointers[BLOCK_STEP_PARAMS.index(BLOCK_STEP_PARAMS[slot] + "_scale")] = scale.data_ptr()
        plan.key = _tensors_key(current) if loras else key  # (the rounding wrote to the LoRAs)
        plan.params = (ctypes.c_void_p * len(BLOCK_STEP_PARAMS))(*pointers)
        return plan.params


def _tensors_key(tensors: list) -> list:
    """What must not change for pointers kept to these tensors to hold: identity, address, dtype, layout, and the
    version every write in place bumps."""
    return [(id(p), p.data_ptr(), p.dtype, p.stride(), p._version) for p in tensors]


@torch.no_grad()
def _lora_copy(lora: torch.Tensor, weight_type: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A LoRA matrix [in, out] of a model whose Linear weights are of `weight_type` rounded in place to the width
    the kernels read it in, so model.py multiplies what they do, and the kernels' copy [in, out]: bf16 for bf16
    weights (half a bf16 step's LoRA bytes, as the official bf16 checkpoints hold them), (None for the scale); else
    int8 with one scale per output (`quantize_int8`). A rounded matrix rounds to the same bits, so one saved from
    such a model loads back as it was."""
    if weight_type in (WEIGHT_TYPES["bfloat16"], WEIGHT_TYPES["bfloat16_panels"]):
        weight = lora.to(torch.bfloat16).contiguous()
        lora.copy_(weight.float())
        return weight, None
    weight, scale = quantize_int8(lora.t())
    lora.t().copy_(weight.float() * scale[:, None])
    return weight.t().contiguous(), scale


def _fused_steps(block: Block, isa: str):
    """Turn a Block into a StepBlock in place (or prepare a StepBlock again) where the C step fits its shapes;
    its LoRA matrices are made contiguous (the kernel's [in, out] row-major), the values and names untouched."""
    att, ffn = block.att, block.ffn
    linears = (att.receptance, att.key, att.value, att.output, ffn.key, ffn.value)
    if (type(block) not in (Block, StepBlock) or "block_step" not in kernels(isa) or att.head_size % 16 or att.x_r.dtype != torch.float32
            or not all(isinstance(m, KernelLinear) and _gemv_kernel(m.weight) in kernels(isa) for m in linears)
            or len({_weight_type(m.weight) for m in linears}) != 1
            or any(m.eps != block.ln1.eps for m in block.modules() if isinstance(m, nn.LayerNorm))):
        return
    for name in LORA_PARAMS:
        if hasattr(att, name):  # layer 0 has no v1, v2
            p = getattr(att, name)
            p.data = p.data.contiguous()
    names = dict(block.named_parameters()) | dict(block.named_buffers())
    slots = [i for i, name in enumerate(BLOCK_STEP_PARAMS) if name in names]
    present = [BLOCK_STEP_PARAMS[i] for i in slots]
    sources = []
    for name in present:
        owner, _, leaf = name.rpartition(".")
        module = block.get_submodule(owner)
        sources.append((module._parameters if leaf in module._parameters else module._buffers, leaf))
    ranks = [getattr(att, name).shape[1] if hasattr(att, name) else 0 for name in ("w1", "a1", "v1", "g1")]
    weight_type = _weight_type(att.receptance.weight)
    rounded = weight_type != WEIGHT_TYPES["float32"] and weight_type != WEIGHT_TYPES["float32_panels"]
    plan = StepPlan(
        isa=isa, slots=slots, sources=sources,
        tree=[(parent, key, child) for parent in block.modules() for key, child in parent._modules.items()],
        modules=tuple(block.modules()),
        dtypes=[names[name].dtype for name in present], strides=[names[name].stride() for name in present],
        sizes=(att.n_head * att.head_size, att.head_size, ffn.key.out_features, *ranks), weight_type=weight_type,
        rounded_loras=[i for i, name in enumerate(present) if rounded and name.removeprefix("att.") in LORA_PARAMS])
    block.__class__ = StepBlock  # (a class swap keeps the module's parameters, names and hooks where they are)
    block.step_plan = plan


@dataclass
class ModelPlan:
    """What a model's one-call steps and last_only prompts (`StepRWKV`, C `model_step`) were prepared for, and the arguments it last
    built. Its blocks' own StepPlans say what each block needs; this holds what the whole step adds."""

    isa: str
    # every (parent's _modules, name, child) of emb, blocks and theirs, as three lists: a module replaced there ends the plan
    parents: list[dict]
    keys: list[str]
    children: list[nn.Module]
    hooks: list[dict]  # the forward hooks and pre-hooks of emb, the blocks' modules, ln_out and head: the C would skip them
    # where every tensor the step reads is (dict, name), as two lists: the blocks', then the embeddings', ln_out's
    # weight and bias, the head's weight (and scale)
    holders: list[dict]
    names: list[str]
    rounded_loras: list[int]  # where the blocks' rounded LoRAs (StepPlan.rounded_loras) are among those
    tensors: list | None = None  # those tensors when `args` was built, and their addresses and strides then
    pointers: list | None = None
    strides: list | None = None
    versions: list | None = None  # the rounded LoRAs' versions then (their copies are made again after a write)
    block_params: list | None = None  # the blocks' parameter arrays (StepPlan.params) `args` points to
    args: tuple | None = None  # model_step's arguments before the step's own (the blocks' arrays, sizes, types, emb ...)
    head: tuple | None = None  # and after them: ln_out's and the head's (weights, type, vocabulary)

    def __getstate__(self):  # (copy.deepcopy and pickle): the cached arguments point into the original's memory
        return {**self.__dict__, "tensors": None, "pointers": None, "strides": None, "versions": None,
                "block_params": None, "args": None, "head": None}


class StepRWKV(RWKV):
    """An RWKV whose one-token steps and `last_only` prompts run in C calls (`model_step`: the embedding, every
    block as StepBlock runs it, the last token's ln_out as KernelLayerNorm does and its head as KernelLinear does),
    so a step or a short prompt pays for one Python round trip instead of one a block and module (0.1B shape, one
    sequence, 1 thread, one process against the blocks' path: int4 7.2 -> 6.6 ms a step, fp32 35.4 -> 33.1; ln_out
    and the head in the call too: a further ~0.3 ms, the modules' Python on caches the step's weights have just
    swept; a 33-token int8 prompt ~2.3 ms of Python around its blocks' C calls). A prompt longer than
    MAX_DECODE_ROWS rows goes in pieces of that many, one call each, the state carried (the bits of the blocks'
    own pieces). Its state and logits are the bits the blocks and modules give one by one. Prompts with every
    position's logits, autograd and anything changed since optimize() take RWKV.forward (and the blocks' own fast
    paths)."""

    model_plan: ModelPlan

    def forward(self, tokens, state=None, *, last_only: bool = False):
        if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and (tokens.shape[1] == 1 or last_only)):
            return super().forward(tokens, state, last_only=last_only)
        B, T = self.check_tokens(tokens, 2, ids=False)  # (model_step checks the ids)
        state = self.check_state(state, B)
        args, cfg = self._step_args(), self.config
        if (args is None or tokens.device.type != "cpu"  # (check_state looks at the first layer only)
                or not all(_c_reads(s, B, cfg.n_embd, cfg.n_head, cfg.head_size) for s in state.layers)):
            return super().forward(tokens, state, last_only=last_only)
        ids = tokens.to(torch.int64).contiguous()
        piece = max(1, MAX_DECODE_ROWS // B)  # (a step is one piece at any batch: model_step slices it)
        logits = torch.empty(B, 1, self.model_plan.head[-1])  # (the head's outputs, what the C writes)
        for start in range(0, T, piece):  # each piece from the state the one before it ends in
            last = start + piece >= T
            state = self._model_step(args, ids[:, start:start + piece].contiguous(), state, logits if last else None)
        return logits, state

    def _model_step(self, args, ids, state: RWKVState, logits) -> RWKVState:
        """One model_step call for ids [B, len] from `state`: the new state; the last tokens' logits into `logits`
        (None: no logits)."""
        (B, T), cfg = ids.shape, self.config
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        given = [t.contiguous() for s in state.layers for t in (s.att_shift, s.wkv, s.ffn_shift)]
        # the new state: the shifts of all layers in one tensor each (a layer's a view of it), each layer's wkv in
        # its own (at B=16 all layers' would be 38 MB: past glibc's reuse limit, fresh pages every step, 20% slower)
        att, ffn, wkv = torch.empty(L, B, C), torch.empty(L, B, C), [torch.empty(B, H, N, N) for _ in range(L)]
        pointers = [(ctypes.c_void_p * L)(*map(torch.Tensor.data_ptr, given[i::3])) for i in range(3)]
        row = B * C * 4
        pointers += [(ctypes.c_void_p * L)(*range(att.data_ptr(), att.data_ptr() + L * row, row)),
                     (ctypes.c_void_p * L)(*map(torch.Tensor.data_ptr, wkv)),
                     (ctypes.c_void_p * L)(*range(ffn.data_ptr(), ffn.data_ptr() + L * row, row))]
        failed = kernels(self.model_plan.isa)["model_step"](*args, ids.data_ptr(), B, T, *pointers, *self.model_plan.head,
                                                            None if logits is None else logits.data_ptr(),
                                                            torch.get_num_threads())
        if failed == 3:  # an id outside the embedding: check_tokens's message says which
            self.check_tokens(ids, 2)
        if failed:
            raise RuntimeError(f"model_step failed for {B} x {T} tokens (code {failed}: 2, its buffers could not be "
                               "allocated; 3, a token id outside the embedding; 4, weights in quads at a level "
                               "without integer products: below avx2)")
        return RWKVState(list(map(LayerState, att.unbind(), wkv, ffn.unbind())))

    def _step_args(self):
        """model_step's arguments but the step's own (tokens, state, output, threads) for the tensors as they are
        now, or None where the C step no longer fits: autograd, a hook, a module replaced, a tensor in another
        dtype, device or layout. Kept while the same tensors hold the same memory (a step checks ~470 tensors
        in ~130 us; rebuilt, each block checks its own)."""
        plan = self.model_plan
        if (not all(map(operator.is_, map(dict.get, plan.parents, plan.keys), plan.children)) or any(plan.hooks)
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or not all(type(block) is StepBlock for block in self.blocks)):  # (one made a Block again)
            return None
        try:
            current = list(map(dict.__getitem__, plan.holders, plan.names))
        except KeyError:  # a parameter deleted
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in current):
            return None
        if (plan.tensors is not None and all(map(operator.is_, current, plan.tensors))
                and list(map(torch.Tensor.data_ptr, current)) == plan.pointers
                and list(map(torch.Tensor.stride, current)) == plan.strides  # (w.data = w.data.t(): same address)
                and [current[i]._version for i in plan.rounded_loras] == plan.versions):
            return plan.args
        plan.tensors = plan.pointers = plan.strides = plan.versions = plan.block_params = plan.args = plan.head = None
        blocks = [block._step_tensors() for block in self.blocks]
        params = [None if c is None else block._step_params(c) for block, c in zip(self.blocks, blocks)]
        emb, ln_out, head = self.emb.weight, self.ln_out, self.head
        head_kernel = _gemv_kernel(head.weight)
        if (any(p is None for p in params) or not all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                                                      for t in (emb, ln_out.weight, ln_out.bias))
                or head_kernel not in kernels(plan.isa) or head.weight.device.type != "cpu"
                or head_kernel in SCALED_KERNELS and head.scale.dtype != torch.float32):
            return None
        sizes = [n for block in self.blocks for n in block.step_plan.sizes]
        first = self.blocks[0]
        plan.tensors, plan.block_params = current, params
        plan.pointers, plan.strides = list(map(torch.Tensor.data_ptr, current)), list(map(torch.Tensor.stride, current))
        plan.versions = [current[i]._version for i in plan.rounded_loras]
        plan.args = (len(params), (ctypes.c_void_p * len(params))(*(ctypes.addressof(p) for p in params)),
                     (ctypes.c_int64 * len(sizes))(*sizes),
                     (ctypes.c_int * len(params))(*(block.step_plan.weight_type for block in self.blocks)),
                     emb.data_ptr(), emb.shape[0], first.ln1.eps, first.att.ln_x.eps, DECAY_SCALE)
        plan.head = (ln_out.weight.data_ptr(), ln_out.bias.data_ptr(), ln_out.eps, head.weight.data_ptr(),
                     head.scale.data_ptr() if head_kernel in SCALED_KERNELS else None,
                     _weight_type(head.weight), head.out_features)
        return plan.args


def _fused_model(model: nn.Module, isa: str):
    """Turn an RWKV whose blocks all became StepBlocks into a StepRWKV in place (or prepare one again) where the
    one-call step fits: blocks with the same norms' eps, ln_out a LayerNorm with a bias (made a KernelLayerNorm:
    prompts then normalize as steps do), the head a KernelLinear."""
    if type(model) not in (RWKV, StepRWKV):
        return
    blocks, ln_out, head = list(model.blocks), model.ln_out, model.head
    if (not blocks or not all(type(b) is StepBlock and b.step_plan.isa == isa for b in blocks)
            or "model_step" not in kernels(isa)
            or len({b.ln1.eps for b in blocks}) != 1 or len({b.att.ln_x.eps for b in blocks}) != 1
            or type(ln_out) not in (nn.LayerNorm, KernelLayerNorm) or ln_out.bias is None
            or type(head) is not KernelLinear or head.isa != isa):
        if type(model) is StepRWKV:
            model.__class__ = RWKV
        return
    ln_out.__class__, ln_out.isa = KernelLayerNorm, isa
    sources, rounded_loras = [], []
    for b in blocks:
        rounded_loras += [len(sources) + i for i in b.step_plan.rounded_loras]
        sources += b.step_plan.sources
    sources += [(model.emb._parameters, "weight"), (ln_out._parameters, "weight"), (ln_out._parameters, "bias"),
                (head._parameters, "weight")] + [(head._buffers, "scale")] * ("scale" in head._buffers)
    modules = (model.emb, *(m for b in blocks for m in b.modules()), ln_out, head)
    tree = [(model._modules, name, model._modules[name]) for name in ("emb", "blocks", "ln_out", "head")]
    tree += [(parent._modules, key, child) for parent in (model.blocks, *modules) for key, child in parent._modules.items()]
    model.__class__ = StepRWKV
    model.model_plan = ModelPlan(isa, *map(list, zip(*tree)),
                                 hooks=[m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules],
                                 holders=[holder for holder, _ in sources], names=[name for _, name in sources],
                                 rounded_loras=rounded_loras)


@torch.no_grad()
def optimize(model: nn.Module, weights: str | None = None, isa: str | None = None) -> nn.Module:
    """Prepare a CPU model for inference (in place; returns it). weights: None keeps the Linear weights as they
    are, "bf16" stores them in bf16, "int8" in int8 with one fp32 scale per output row, "int4" in 4 bits with one
    fp32 scale per INT4_GROUP inputs of a row (the head included).
    isa: the highest instruction-set level of the kernels to use (`rwkv_lm.ops.cpu_kernels.LEVELS`); None: the
    best this CPU has (or the cap RWKV_LM_CPU_ISA sets).

    Decode steps and prompts run in the C kernels, activations in fp32, each row's logits the same in any batch;
    anything under autograd runs the torch ops (int8 and int4 weights dequantized for them). No parameter requires
    grad afterwards, so steps take the kernels with or without torch.no_grad(); `model.requires_grad_()` makes it
    trainable (in torch ops)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be None (keep the model's dtype), 'bf16', 'int8' or 'int4', got {weights!r}")
    if next(model.parameters()).device.type != "cpu":
        return model
    dtype, isa = WEIGHTS[weights], isa_level(isa)
    # quads for all or none: a block's C step takes one weight type for its six products (a width no multiple of
    # ACT_GROUP keeps them all row-major). (No list of the Linears: each one's weight is freed as its KernelLinear
    # replaces it, not after all of them are made.)
    quads = all(m.in_features % ACT_GROUP == 0 for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.bias is not None:
                continue
            if dtype is not None:  # (again where no kernel takes the weight: moved to another dtype, say)
                if type(child) is not KernelLinear or child.weights != dtype or _gemv_kernel(child.weight) is None:
                    setattr(parent, name, KernelLinear(child, dtype, isa, quads))
            elif type(child) is nn.Linear and child.weight.dtype == torch.float32:
                if "gemv_f32" in kernels(isa):
                    setattr(parent, name, KernelLinear(child, torch.float32, isa))
                else:
                    child.weight.data = child.weight.data.t().contiguous().t()
    for module in model.modules():
        if isinstance(module, Block):
            _fused_steps(module, isa)
    _fused_model(model, isa)
    model.requires_grad_(False).eval()
    for module in model.modules():
        if type(module) is StepBlock and module.step_plan.rounded_loras:  # their LoRAs rounded now
            module._step_params(module._step_tensors())
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the old weights' memory back to the system. glibc keeps freed blocks under its mmap threshold (which
    rises to 32 MiB as big blocks are freed) for reuse: a 0.1B fp32 model kept 255 MB of its replaced Linears'."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # (not glibc)
        pass
