"""Make a model fast for inference on a CPU without changing its parameter names or what it computes.

One-token steps are matrix-vector products, bound by how fast the weights stream from memory, so the
weights' width and the way they are read matter more than the model code. Where the CPU has avx512f,
`optimize` swaps every bias-free Linear for a `KernelLinear` (same `weight` name) whose decode steps (up
to MAX_KERNEL_ROWS rows) run in small C kernels (`cpu_kernels.c`, compiled at first use) that stream each
weight once per step; a prompt (more rows) goes through torch's matmul as before. A one-token step of a
block runs in one C call (`StepBlock`: norms, mixes, LoRAs, recurrence, products) where its shapes fit the
kernels, else the time mix and the channel mix in fewer torch ops; a prompt runs model.py's code. (The
WKV-7 recurrence has its own C kernel for CPU inference in ops/wkv7/cpu.py, used by every model.)
- fp32 (the default): the weights stay as they are; without avx512f they are only stored column-major
  ([in, out] in memory, viewed as the usual [out, in]), which lets BLAS read them in one pass;
- bf16 weights (`weights="bf16"`): Linear weights are kept in bf16 (half the bytes), everything else and
  every activation stays fp32. A step uses the avx512_bf16 kernel (fp32-accurate in the activations); a
  prompt goes through oneDNN's bf16 matmul.
"""
from __future__ import annotations

import ctypes
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_kernels import kernels
from .model import DECAY_SCALE, Block, ChannelMix, TimeMix
from .ops.wkv7 import wkv7_one
from .state import LayerState

MAX_KERNEL_ROWS = 16  # the kernels' MAX_BATCH: up to this many rows (a decode step of a batch); more: a matmul
MAX_BF16_IN = 16384  # the bf16 kernel's MAX_IN: wider inputs take the matmul
LORA_PARAMS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def _gemv_kernel(weight: torch.Tensor) -> str | None:
    """The kernel that multiplies by this [out, in] weight where one fits its shape and it is stored row-major
    (a weight assigned after optimize() may not be), else None."""
    out_features, in_features = weight.shape
    if weight.stride() != (in_features, 1):
        return None
    if weight.dtype == torch.bfloat16:
        fits = in_features % 64 == 0 and in_features <= MAX_BF16_IN
        return "gemv_bf16" if fits else None
    fits = weight.dtype == torch.float32 and in_features % 16 == 0 and out_features % 4 == 0  # batches: 4 rows at a time
    return "gemv_f32" if fits else None


def _gemv(kernel_name: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] fp32 (rows <= MAX_KERNEL_ROWS) times weight [out, in] row-major, transposed: [rows, out]."""
    (rows, in_features), out_features = x.shape, weight.shape[0]
    x = x.float().contiguous()
    y = torch.empty(rows, out_features)
    if kernels()[kernel_name](weight.data_ptr(), x.data_ptr(), y.data_ptr(), out_features, in_features, rows,
                               torch.get_num_threads()):
        raise RuntimeError(f"{kernel_name} refused a [{rows}, {in_features}] input or could not allocate its buffer")
    return y


class KernelLinear(nn.Module):
    """A bias-free Linear (fp32 or bf16 weight, fp32 activations) whose decode steps run in a C kernel.

    Inference only; the weight keeps its name and is stored row-major, the order the kernels stream it.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(dtype).contiguous(), requires_grad=False)

    def forward(self, x):
        rows = x.numel() // self.in_features
        # chosen at each call: .to() may have changed the weight's dtype or device since optimize()
        fits = self.weight.device.type == "cpu" and rows <= MAX_KERNEL_ROWS and not (torch.is_grad_enabled() and x.requires_grad)
        kernel = _gemv_kernel(self.weight) if fits else None  # (the kernels have no backward)
        if kernel not in kernels():
            return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        y = _gemv(kernel, self.weight, x.reshape(rows, self.in_features))
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class StepTimeMix(TimeMix):
    """TimeMix whose one-token steps (T == 1) compute model.py's arithmetic in fewer, larger ops (the recurrence
    is ops.wkv7's, one C pass on a CPU); longer inputs run TimeMix.forward itself."""

    def forward(self, x, shift, wkv_state, v_first):
        if x.shape[1] != 1 or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return super().forward(x, shift, wkv_state, v_first)  # a prompt, training, or moved by .to()
        B, _, C = x.shape
        H, N = self.n_head, self.head_size
        x1 = x[:, 0]
        mixes = torch.cat((self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))  # [6, 1, C], always current
        xr, xw, xk, xv, xa, xg = torch.addcmul(x1, shift - x1, mixes)  # the six token-shift mixes at once
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        lora = self._lora
        log_w = -DECAY_SCALE * torch.sigmoid(self.w0[0] + lora(torch.tanh(lora(xw, self.w1)), self.w2))
        a = torch.sigmoid(self.a0[0] + lora(lora(xa, self.a1), self.a2))
        g = lora(torch.sigmoid(lora(xg, self.g1)), self.g2)
        kk = F.normalize((k * self.k_k[0]).view(B, H, N), dim=-1)
        k = k * (1 + (a - 1) * self.k_a[0])
        if self.layer_id == 0:
            v_first = v.view(B, 1, C)
        else:
            v = v + (v_first.view(B, C) - v) * torch.sigmoid(self.v0[0] + lora(lora(xv, self.v1), self.v2))

        y, new_state = wkv7_one(wkv_state, *(t.view(B, H, N) for t in (r, log_w, k, v)), -kk, kk * a.view(B, H, N))
        y = F.group_norm(y.view(B, C), H, self.ln_x.weight, self.ln_x.bias, self.ln_x.eps)
        bonus = (r * k * self.r_k.view(C)).view(B, H, N).sum(-1, keepdim=True) * v.view(B, H, N)
        return self.output((y + bonus.view(B, C)) * g).view(B, 1, -1), x[:, -1], new_state, v_first

    def _lora(self, x, w):
        """x @ w for a LoRA matrix w [in, out], which _fast_steps stores transposed: the kernel's [out, in] row-major."""
        if (self.lora_kernel not in kernels() or x.shape[0] > MAX_KERNEL_ROWS
                or _gemv_kernel(w.t()) != self.lora_kernel):
            return x @ w  # (the last: a LoRA assigned since optimize() is not stored transposed)
        return _gemv(self.lora_kernel, w.t(), x)


def _fast_steps(att: TimeMix):
    """Turn a TimeMix into a StepTimeMix in place (parameters untouched) where the kernel fits it."""
    fits = att.x_r.dtype == torch.float32 and "gemv_f32" in kernels()
    if type(att) is TimeMix and fits:
        att.__class__ = StepTimeMix
        loras = [getattr(att, name) for name in LORA_PARAMS if hasattr(att, name)]  # layer 0 has no v1, v2
        for p in loras:
            p.data = p.data.t().contiguous().t()
        lora_kernels = {_gemv_kernel(p.t()) for p in loras}
        att.lora_kernel = lora_kernels.pop() if len(lora_kernels) == 1 else None  # one kernel for all, or torch for all


class StepChannelMix(ChannelMix):
    """ChannelMix whose one-token steps mix the token shift in one op instead of a concatenation and three."""

    def forward(self, x, shift):
        if x.shape[1] != 1:
            return super().forward(x, shift)
        h = torch.relu(self.key(torch.addcmul(x, shift.unsqueeze(1) - x, self.x_k)))
        return self.value(h * h), x[:, -1]


# in the order of the C enum of block_step_f32; a name the block lacks (ln0, v0 ... after the first) is passed as NULL
BLOCK_STEP_PARAMS = (
    "ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    *(f"att.{name}" for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2",
                                 "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")),
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight", "att.ln_x.weight", "att.ln_x.bias",
    "ffn.x_k", "ffn.key.weight", "ffn.value.weight",
)


class StepBlock(Block):
    """Block whose one-token steps run in one C call (`block_step_f32`): model.py's arithmetic without the ~130
    small torch ops per layer that took a quarter of a batched step and a third of a one-row step. Anything else
    (a prompt, or a dtype that .to() changed since optimize()) runs Block.forward."""

    def forward(self, x, v_first, state: LayerState):
        fp32, (B, T, C) = torch.float32, x.shape
        att = self.att
        H, N = att.n_head, att.head_size
        # the parameters as they are now (load_state_dict(assign=True) replaces them), in the layouts the C reads
        current = self.step_getter(self)
        if (T != 1 or B > MAX_KERNEL_ROWS or torch.is_grad_enabled() or x.dtype != fp32 or x.device.type != "cpu"
                or "block_step_f32" not in kernels()  # (RWKV_LM_CPU_ISA lowered since optimize())
                or state.att_shift.shape != (B, C) or state.ffn_shift.shape != (B, C) or state.wkv.shape != (B, H, N, N)
                or state.att_shift.dtype != fp32 or state.ffn_shift.dtype != fp32 or state.wkv.dtype != fp32
                or not all(p.dtype == dtype and p.device.type == "cpu" and p.stride() == stride
                           for p, dtype, stride in zip(current, self.step_dtypes, self.step_strides))):
            return super().forward(x, v_first, state)  # a prompt, training, a batch too wide, or anything changed
        x_out, att_shift, ffn_shift, wkv = torch.empty(B, 1, C), torch.empty(B, C), torch.empty(B, C), torch.empty(B, H, N, N)
        v_first = torch.empty(B, 1, C) if att.layer_id == 0 else v_first.contiguous()
        pointers = [None] * len(BLOCK_STEP_PARAMS)
        for slot, p in zip(self.step_slots, current):
            pointers[slot] = p.data_ptr()
        params = (ctypes.c_void_p * len(BLOCK_STEP_PARAMS))(*pointers)
        inputs = (x.contiguous(), state.att_shift.contiguous(), state.wkv.contiguous(), state.ffn_shift.contiguous())
        if kernels()["block_step_f32"](params, inputs[0].data_ptr(), x_out.data_ptr(), v_first.data_ptr(),
                                       *(t.data_ptr() for t in inputs[1:]), att_shift.data_ptr(), wkv.data_ptr(),
                                       ffn_shift.data_ptr(), B, *self.step_sizes, self.ln1.eps, att.ln_x.eps, DECAY_SCALE,
                                       att.receptance.weight.dtype == torch.bfloat16, torch.get_num_threads()):
            raise RuntimeError(f"block_step_f32 refused a batch of {B} or could not allocate its buffers")
        return x_out, v_first, LayerState(att_shift, wkv, ffn_shift)


def _fused_steps(block: Block):
    """Turn a Block into a StepBlock in place (parameters untouched) where the C step fits all its shapes."""
    att, ffn = block.att, block.ffn
    linears = (att.receptance, att.key, att.value, att.output, ffn.key, ffn.value)
    if (type(block) is not Block or "block_step_f32" not in kernels() or type(att) is not StepTimeMix
            or att.lora_kernel != "gemv_f32" or att.head_size % 16 or not isinstance(ffn, StepChannelMix)
            or not all(isinstance(m, KernelLinear) and _gemv_kernel(m.weight) in kernels() for m in linears)
            or len({m.weight.dtype for m in linears}) != 1
            or any(m.eps != block.ln1.eps for m in block.modules() if isinstance(m, nn.LayerNorm))):
        return
    block.__class__ = StepBlock
    names = dict(block.named_parameters())
    block.step_slots = [i for i, name in enumerate(BLOCK_STEP_PARAMS) if name in names]
    present = [BLOCK_STEP_PARAMS[i] for i in block.step_slots]
    block.step_getter = operator.attrgetter(*present)
    # what the C was prepared for: these dtypes and strides (LoRAs transposed, everything else contiguous)
    block.step_dtypes = [names[name].dtype for name in present]
    block.step_strides = [names[name].stride() for name in present]
    ranks = [getattr(att, name).shape[1] if hasattr(att, name) else 0 for name in ("w1", "a1", "v1", "g1")]
    block.step_sizes = (att.n_head * att.head_size, att.head_size, ffn.key.out_features, *ranks)


@torch.no_grad()
def optimize(model: nn.Module, weights: str | None = None) -> nn.Module:
    """Prepare a CPU model for inference (in place; returns it). weights="bf16" stores Linear weights in bf16.

    Decode steps of up to 16 rows run in the C kernels; wider batches, prompts and anything under autograd run
    the torch ops (with bf16 weights those round activations to bf16 as well)."""
    if weights not in (None, "bf16"):
        raise ValueError(f"weights must be None (keep the model's dtype) or 'bf16', got {weights!r}")
    if next(model.parameters()).device.type != "cpu":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.bias is not None:
                continue
            if weights == "bf16":
                setattr(parent, name, KernelLinear(child, torch.bfloat16))
            elif child.weight.dtype == torch.float32:
                if "gemv_f32" in kernels():
                    setattr(parent, name, KernelLinear(child, torch.float32))
                else:
                    child.weight.data = child.weight.data.t().contiguous().t()
    for module in model.modules():
        if isinstance(module, TimeMix):
            _fast_steps(module)
        elif type(module) is ChannelMix:
            module.__class__ = StepChannelMix
    for module in model.modules():
        if type(module) is Block:
            _fused_steps(module)
    return model.eval()
