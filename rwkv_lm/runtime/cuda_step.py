"""One decode step of an RWKV-7 model on a GPU with fused kernels: `fused_step(model, tokens, state)`.

model.step on a GPU is launch-bound: about 60 small torch kernels per block around the matrix products.
Here the work between the products runs in five kernels per block (`cuda/rwkv7_step.cu`: norms and
token-shift mixes; the LoRA nonlinearities; decay, a, kk, value residual, the WKV-7 step, ln_x, bonus and
gate; ln2 and the channel mix's shift; the squared ReLU), the products through cuBLAS, the two residual
adds inside them (addmm). Same arithmetic as model.py, in fp32 inside each kernel (each output rounded
once to the model's dtype); tests/test_cuda_step.py runs the kernels through the CPU emulation against
model.py. `rwkv_lm.runtime.cuda_graphs` replays whole steps of this as CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import DECAY_SCALE, RWKV, Block, ChannelMix, TimeMix
from ..ops import cuda_kernels
from ..ops.wkv7.cuda import KERNEL_DTYPES
from ..state import LayerState, RWKVState

SOURCE = cuda_kernels.source("rwkv7_step.cu")
ROW_THREADS = 256  # step_mix and step_ffn_mix: one block per row
TIME_MIX_THREADS = 128  # step_time_mix: one block per (head, row); a warp per state row at a time
ELEMENTWISE_THREADS, MAX_ELEMENTWISE_BLOCKS = 256, 1024

_compiled: dict[tuple, cuda_kernels.CupyKernels | None] = {}


def kernel_names(dtype: torch.dtype, head_size: int) -> list[str]:
    """The instantiations one model needs, e.g. `step_time_mix<bf16_t, 64>`."""
    F_ = KERNEL_DTYPES[dtype]
    return [f"step_mix<{F_}>", f"step_lora<{F_}>", f"step_time_mix<{F_}, {head_size}>", f"step_ffn_mix<{F_}>",
            f"step_relu_sq<{F_}>"]


def compiled(device: torch.device, dtype: torch.dtype, head_size: int):
    """The kernels for one device, dtype and head size, compiled on first use; None (one warning) if that fails."""
    key = (device.index, dtype, head_size)
    if key not in _compiled:
        try:
            _compiled[key] = cuda_kernels.CupyKernels(SOURCE, kernel_names(dtype, head_size), device.index or 0)
        except Exception as e:
            cuda_kernels.warn_once(f"cuda_step: compiling {SOURCE} failed; using model.step:\n{e}")
            _compiled[key] = None
    return _compiled[key]


def unusable_reason(model, state=None, kernels=None) -> str | None:
    """Why the fused step cannot serve this model and state (None: it can). kernels: the ones to launch (None:
    the compiled ones for the model's GPU, which this then compiles)."""
    if type(model) is not RWKV or any(type(b) is not Block or type(b.att) is not TimeMix or type(b.ffn) is not ChannelMix
                                      for b in model.blocks):
        return "the fused step runs rwkv_lm.model.RWKV as it is (no subclass or swapped modules)"
    params = list(model.parameters())
    p = params[0]
    if len({(q.device, q.dtype) for q in params}) != 1:
        return "the model's parameters are on several devices or of several dtypes"
    if p.dtype not in KERNEL_DTYPES:
        return f"no fused kernels for {p.dtype}"
    N = model.config.head_size
    if N % 32:
        return f"the fused kernels need a head size that is a multiple of 32, got {N}"
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    if any(m.weight is None or m.bias is None for m in norms):
        return "the fused kernels read every norm's weight and bias"
    if len({m.eps for m in norms if isinstance(m, torch.nn.LayerNorm)}) > 1:
        return "the fused kernels take one eps for all layer norms"
    if any(not q.is_contiguous() for name, q in model.named_parameters() if not name.endswith("weight") or ".ln" in name):
        return "the fused kernels read the small parameters as contiguous tensors"
    if state is not None and any(t.device != p.device for t in state.tensors().values()):
        return "the state is on another device than the model"
    if kernels is None:
        if p.device.type != "cuda":
            return "the fused step needs a model on a CUDA GPU"
        if not cuda_kernels.available() or compiled(p.device, p.dtype, N) is None:
            return "the fused kernels are unavailable here (see the warning above)"
    return None


@torch.no_grad()
def fused_step(model: RWKV, tokens: torch.Tensor, state: RWKVState | None = None, *, kernels=None):
    """model.step (tokens [B] -> (logits [B, V], new state)) through the fused kernels, inference only (it
    records no gradient). Where they cannot serve the model (see `unusable_reason`) it runs model.step with
    one warning. The given state is left as it is. kernels: for tests (the CPU emulation)."""
    model.check_tokens(tokens, 1)
    state = model.check_state(state, tokens.shape[0])
    reason = unusable_reason(model, state, kernels)
    if reason:
        cuda_kernels.warn_once(f"cuda_step: {reason}; using model.step")
        return model.step(tokens, state)
    return step(model, tokens, state, kernels or model_kernels(model))


def model_kernels(model: RWKV):
    """The compiled kernels for the model's device, dtype and head size (None where they failed)."""
    p = model.emb.weight
    return compiled(p.device, p.dtype, model.config.head_size)


def step(model: RWKV, tokens: torch.Tensor, state: RWKVState, kernels):
    """The fused step with no checks and no synchronization (what a CUDA graph captures): tokens [B] in range,
    state of the model's shapes, `unusable_reason` None."""
    x = model.emb(tokens)
    v_first, layers = None, []
    for block, layer_state in zip(model.blocks, state.layers):
        x, v_first, layer_state = block_step(kernels, block, x, v_first, layer_state)
        layers.append(layer_state)
    return model.head(model.ln_out(x)), RWKVState(layers)


def _elementwise_grid(n: int) -> tuple[int]:
    return (max(1, min(MAX_ELEMENTWISE_BLOCKS, -(-n // ELEMENTWISE_THREADS))),)


def block_step(kernels, block: Block, x: torch.Tensor, v_first, state: LayerState):
    """Block.forward for one token per row: x [B, C] (model dtype), v_first [B, C] or None (layer 0) ->
    (x, v_first, new LayerState)."""
    att, ffn = block.att, block.ffn
    B, C = x.shape
    H, N = att.n_head, att.head_size
    dtype, F_ = x.dtype, KERNEL_DTYPES[x.dtype]
    first = att.layer_id == 0
    att_shift, ffn_shift = (s.to(dtype).contiguous() for s in (state.att_shift, state.ffn_shift))
    wkv = state.wkv.float().contiguous()

    mixed, new_att_shift = x.new_empty(6, B, C), x.new_empty(B, C)
    x_ln0 = x.new_empty(B, C) if first else None
    ln0_weight, ln0_bias = (block.ln0.weight, block.ln0.bias) if first else (None, None)
    kernels(f"step_mix<{F_}>", (B,), ROW_THREADS, C, block.ln1.eps, x, ln0_weight, ln0_bias, block.ln1.weight, block.ln1.bias, att_shift, att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g,
            x_ln0, new_att_shift, mixed)
    if first:
        x = x_ln0
    xr, xw, xk, xv, xa, xg = mixed
    r, k, v = F.linear(xr, att.receptance.weight), F.linear(xk, att.key.weight), F.linear(xv, att.value.weight)
    w_down, a_down, g_down = xw @ att.w1, xa @ att.a1, xg @ att.g1
    kernels(f"step_lora<{F_}>", _elementwise_grid(w_down.numel() + g_down.numel()), ELEMENTWISE_THREADS,
            w_down.numel(), w_down, g_down.numel(), g_down)
    w_up, a_up, gate = w_down @ att.w2, a_down @ att.a2, g_down @ att.g2
    v_up = None if first else (xv @ att.v1) @ att.v2

    y, new_wkv = x.new_empty(B, C), torch.empty_like(wkv)
    v_first_out = x.new_empty(B, C) if first else None
    kernels(f"step_time_mix<{F_}, {N}>", (H, B), TIME_MIX_THREADS, DECAY_SCALE, att.ln_x.eps, r, k, v, w_up, a_up,
            v_up, gate, None if first else v_first, v_first_out, att.w0, att.a0, None if first else att.v0, att.k_k,
            att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias, wkv, new_wkv, y)
    x = torch.addmm(x, y, att.output.weight.t())

    ffn_in, new_ffn_shift = x.new_empty(B, C), x.new_empty(B, C)
    kernels(f"step_ffn_mix<{F_}>", (B,), ROW_THREADS, C, block.ln2.eps, x, block.ln2.weight, block.ln2.bias, ffn_shift,
            ffn.x_k, new_ffn_shift, ffn_in)
    hidden = F.linear(ffn_in, ffn.key.weight)
    kernels(f"step_relu_sq<{F_}>", _elementwise_grid(hidden.numel()), ELEMENTWISE_THREADS, hidden.numel(), hidden)
    x = torch.addmm(x, hidden, ffn.value.weight.t())
    return x, v_first_out if first else v_first, LayerState(new_att_shift, new_wkv, new_ffn_shift)
