"""Decode steps on a GPU as CUDA graphs: a whole model step (the fused step of `rwkv_lm.runtime.cuda_step`) captured
once per batch-size bucket (1, 2, 4, ..., 256) and replayed for every token. Opt-in, off by default: nothing
of it has run on a GPU yet (bench/RESULTS.md).

How a serving loop calls it:

    from rwkv_lm.runtime.cuda_graphs import decode_step
    step = decode_step(model)            # once per model, kept: it holds the graphs. CUDAGraphStep(model) when
                                         # RWKV_LM_CUDA_GRAPHS=1 (or graphs=True) and the model is on a GPU,
                                         # else model.step under torch.no_grad()
    logits, state = step(tokens, state)  # tokens: [B] int64 on the model's device; state: None (zeros),
                                         # model.init_state(B), a state a step returned, or RWKVState.cat/select
                                         # of such; logits [B, V] in the model's dtype

The contract is model.step's for inference: the given state is left as it is and the new one is a fresh
copy (it stays valid whatever runs next); no gradient is recorded. B may change from call to call: rows are
padded up to the bucket (the padding rows' results are dropped; no operation mixes rows). A graph is made
on the first use of its bucket and kept for the model's device and dtype: graphs read the parameters where
they were when captured, so in-place updates are seen, and moving or converting the model (.to()) is
noticed (every graph is dropped and made again on use), but after replacing parameter tensors
(load_state_dict(assign=True)) call `reset()`. Where capture fails, or the fused step cannot serve the
model, steps run eagerly, with one warning.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import cuda_step
from ..ops.cuda_kernels import warn_once
from ..state import LayerState, RWKVState

ENV = "RWKV_LM_CUDA_GRAPHS"  # "1": decode_step uses graphs on a GPU
MAX_GRAPH_BATCH = 256  # the largest batch replayed as a graph (bucket); wider steps run eagerly
WARMUP_STEPS = 2  # eager runs on a side stream before a capture (compiles, cuBLAS handles and workspaces)


def bucket_size(batch_size: int, max_batch: int = MAX_GRAPH_BATCH) -> int | None:
    """The smallest power of two holding batch_size rows; None above max_batch (those steps run eagerly)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    bucket = 1 << (batch_size - 1).bit_length()
    return bucket if bucket <= max_batch else None


def graphs_enabled(graphs: bool | None = None) -> bool:
    """graphs as given, or (None) whether the environment variable RWKV_LM_CUDA_GRAPHS is "1"."""
    return os.environ.get(ENV, "0") == "1" if graphs is None else graphs


def decode_step(model, graphs: bool | None = None, max_batch: int = MAX_GRAPH_BATCH):
    """The step function for a decode loop: `step(tokens [B], state) -> (logits [B, V], new state)` (see the
    module docstring). A CUDAGraphStep where graphs are enabled and the model is on a GPU, else model.step
    without gradients."""
    if graphs_enabled(graphs) and next(model.parameters()).device.type == "cuda":
        return CUDAGraphStep(model, max_batch)
    return torch.no_grad()(model.step)


def capture_cuda_graph(fn, pool):
    """Run fn a few times on a side stream, then capture one run in a CUDA graph: (its outputs, replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return outputs, graph.replay


class _Graph:
    """One bucket: static inputs (tokens [b]; per kind of state tensor, one buffer [L, b, ...] whose layer
    slices are what the step reads) and the captured step's outputs."""

    def __init__(self, model, bucket, kernels, capture, pool):
        state = model.init_state(bucket)
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=model.emb.weight.device)
        self.inputs = [torch.stack([getattr(s, kind) for s in state.layers]) for kind in ("att_shift", "wkv", "ffn_shift")]
        static_state = RWKVState([LayerState(*(x[i] for x in self.inputs)) for i in range(len(state.layers))])
        self._rows: dict[int, list[torch.Tensor]] = {}
        (self.logits, self.state), self.replay = capture(
            lambda: cuda_step.step(model, self.tokens, static_state, kernels), pool)

    def rows(self, batch_size):
        """The first batch_size rows of every static state tensor, in RWKVState.tensors() order."""
        if batch_size not in self._rows:
            self._rows[batch_size] = [x[i, :batch_size] for i in range(self.inputs[0].shape[0]) for x in self.inputs]
        return self._rows[batch_size]

    def __call__(self, tokens, state):
        B = tokens.shape[0]
        self.tokens[:B].copy_(tokens)
        torch._foreach_copy_(self.rows(B), list(state.tensors().values()))
        self.replay()
        stacked = [torch.stack([getattr(s, kind)[:B] for s in self.state.layers]) for kind in ("att_shift", "wkv", "ffn_shift")]
        return self.logits[:B].clone(), RWKVState([LayerState(*layer) for layer in zip(*(x.unbind(0) for x in stacked))])


class CUDAGraphStep:
    """model.step for inference on a GPU through CUDA graphs of the fused step, one per batch-size bucket
    (module docstring). kernels and capture: for tests (the CPU emulation, and a capture that replays eagerly)."""

    def __init__(self, model, max_batch: int = MAX_GRAPH_BATCH, *, kernels=None, capture=None):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a power of two, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self._kernels, self._capture = kernels, capture or capture_cuda_graph
        self.reset()

    def reset(self):
        """Drop every graph (they are made again on use): after the model's parameters were replaced."""
        self._graphs: dict[int, _Graph | None] = {}  # bucket -> graph, None where it cannot be made
        self._params = list(self.model.parameters())
        self._pointers = self._parameter_pointers()
        self._pool = None

    def _parameter_pointers(self):
        return [p.data_ptr() for p in self._params]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: RWKVState | None = None):
        model = self.model
        model.check_tokens(tokens, 1)
        state = model.check_state(state, tokens.shape[0])
        if self._parameter_pointers() != self._pointers:  # moved or converted since the graphs were made
            self.reset()
        bucket = bucket_size(tokens.shape[0], self.max_batch)
        graph = self._graph(bucket, state) if bucket else None
        if graph is None:
            return cuda_step.fused_step(model, tokens, state, kernels=self._kernels)
        return graph(tokens, state)

    def _graph(self, bucket, state):
        """The bucket's graph, captured on first use; None where the fused step cannot serve or capture failed."""
        p = self._params[0]
        if bucket not in self._graphs:
            self._graphs[bucket] = None
            reason = cuda_step.unusable_reason(self.model, state, self._kernels)
            if reason:
                warn_once(f"cuda_graphs: {reason}; eager steps")
                return None
            kernels = self._kernels or cuda_step.model_kernels(self.model)
            try:
                with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
                    if self._pool is None and p.is_cuda:
                        # one memory pool for every bucket: the graphs run one at a time on one stream and each
                        # one's outputs are copied out right after its replay, so one's temporaries may reuse another's
                        self._pool = torch.cuda.graph_pool_handle()
                    self._graphs[bucket] = _Graph(self.model, bucket, kernels, self._capture, self._pool)
            except Exception as e:
                warn_once(f"cuda_graphs: capturing a step of {bucket} rows failed ({type(e).__name__}: {e}); eager steps")
        return self._graphs[bucket]

