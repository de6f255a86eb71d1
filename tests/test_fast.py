"""The CPU inference preparation: same parameters and names, same results (fp32), bf16 products (bf16 weights
times activations rounded to bf16, fp32 sums) on every level.

Every test runs at each level of the CPU kernels this machine has (RWKV_LM_CPU_ISA, if set, caps them) and
states which kernels it expects at that level; the tolerance follows the path that level runs."""
import copy
import os
import pickle

import pytest
import torch
import torch.nn as nn

import rwkv_lm
from rwkv_lm import RWKVConfig
from rwkv_lm.ops.cpu_kernels import ISA_ENV, LEVELS, isa_level, kernels
from rwkv_lm.checkpoint import dequantize
from rwkv_lm.runtime import cpu as fast_module
from rwkv_lm.lora import LoRA
from rwkv_lm.model import RWKV, Block
from rwkv_lm.ops.cpu_kernels import ACT_GROUP, INT4_GROUP, QUAD_ROWS, WEIGHT_TYPES, dequantize_int4, round_activations
from rwkv_lm.runtime.cpu import (HUGE_PAGE, KERNEL_OF, LORA_PARAMS, MAX_DECODE_ROWS, KernelLayerNorm, KernelLinear, StepBlock,
                                 StepRWKV, _gemv_kernel, optimize, quantize_int4, quantize_int8)
from rwkv_lm.testing import random_model, rel_err

from conftest import assert_close

# every level builds every kernel but those of weights in quads (the integer products'); the levels differ in vector width
# and in the bf16 and integer products
ALL_KERNELS = {"gemv_f32", "gemv_f32_panels", "gemv_bf16", "gemv_bf16_panels", "gemv_i8", "gemv_i4", "gemv_cols", "wkv7_f32", "block_step", "model_step", "layer_norm",
               "mask_logits"}
INTEGER_LEVELS = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")  # int8 activations, quads
BF16_DOT_LEVELS = ("avx512_bf16", "amx")  # bf16 products on a bf16 dot product or tiles, weights row-major (else in panels)
VECTOR_WIDTH = {"generic": 4, "avx2": 8, "avx512": 16, "avx512_vnni": 16, "avx512_bf16": 16, "amx": 16, "neon": 4}
BF16_MODEL_RTOL = 5e-3  # (see assert_bf16_close)
BF16_RTOL = 1e-5  # one bf16 product against torch's on the same rounded inputs: exact products, sums in another order
BF16_MATMUL_RTOL = 3e-2  # oneDNN's bf16 matmul (a long prompt's logits at every position) rounds the activations too


@pytest.fixture(autouse=True, params=LEVELS)
def isa(request, monkeypatch):
    """Run the test with the kernels built for this level; skip the levels this CPU (or the cap) lacks."""
    level, top = request.param, isa_level()
    if LEVELS.index(level) > LEVELS.index(top):
        why = f"{ISA_ENV}={os.environ[ISA_ENV]}" if os.environ.get(ISA_ENV) else "this CPU's flags"
        pytest.skip(f"the kernels run up to {top} here ({why}), not {level}")
    monkeypatch.setenv(ISA_ENV, level)
    if not kernels():
        pytest.skip(f"the {level} kernels could not be built here (see the warning: is a C compiler installed?)")
    assert set(kernels()) == (ALL_KERNELS | {"gemv_i8_quads", "gemv_i4_quads"} if level in INTEGER_LEVELS else ALL_KERNELS)
    assert kernels().level == level
    # int8 and int4 weights in quads where integer products take them (int8: where AMX's tiles do not)
    assert kernels().int8_quads == (level in INTEGER_LEVELS and level != "amx")
    assert kernels().int4_quads == (level in INTEGER_LEVELS)
    assert kernels().int8_activations == (level in INTEGER_LEVELS)
    assert kernels().bf16_panels == (level not in BF16_DOT_LEVELS)
    assert kernels().vector_width == VECTOR_WIDTH[level], "built for another instruction set than the level's"
    # the amx level's products really run on the tiles (not quietly on the AVX-512 kernels), and no other's do
    assert kernels().amx_tiles == (level == "amx"), f"AMX tiles in use at {level}: {kernels().amx_tiles}"
    return level


@pytest.fixture
def model():
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=2)


def test_fp32_layout_changes_nothing_but_speed(model, tmp_path):
    tokens = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    fast = optimize(copy.deepcopy(model))
    assert isinstance(fast.head, KernelLinear) and fast.head.weight.dtype == torch.float32
    with torch.no_grad():
        assert_close(fast(tokens)[0], model(tokens)[0], 1e-5, "logits")
    assert fast.state_dict().keys() == model.state_dict().keys()
    reloaded = rwkv_lm.load(rwkv_lm.save(fast, tmp_path / "f.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("assign", [False, True])
def test_fp32_panels_load_and_save_as_dense_weights(model, assign):
    """fp32 weights live in panels, but state_dict() gives [out, in] (contiguous copies, what checkpoints and adapters
    read), and load_state_dict takes [out, in] into the panels, copied or assigned: the kernels then compute the new
    model. A weight of another shape is refused in [out, in] terms."""
    fast = optimize(copy.deepcopy(model))
    assert fast.head.weight.dim() == 3 and _gemv_kernel(fast.head.weight) == "gemv_f32_panels"
    saved = fast.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert saved["blocks.0.att.key.weight"].is_contiguous(), "(one panel: not a view of it, which safetensors refuses)"
    other = random_model(model.config, seed=99)
    fast.load_state_dict(other.state_dict(), assign=assign)
    assert _gemv_kernel(fast.head.weight) == "gemv_f32_panels"
    # (assigned, the LoRAs lose the transposed layout the C step reads: the blocks' torch ops, the head's kernel)
    assert assign or fast._step_args() is not None, "the one-call C step"
    tokens = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(fast(tokens, last_only=True)[0], other(tokens, last_only=True)[0], 1e-5, "logits after loading")
    loaded = fast.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
    with pytest.raises(RuntimeError, match=r"head.weight: copying a param with shape \(300, 32\) into a weight of shape \(300, 64\)"):
        fast.load_state_dict({**other.state_dict(), "head.weight": torch.zeros(300, 32)}, assign=assign)


def test_panels_moved_to_bf16_are_prepared_again(model):
    """An fp32-prepared model moved to bf16 keeps its panels (a kernel takes bf16 ones at every level), and prepared
    for bf16 it gets the layout its level's bf16 products stream: panels, or rows where a bf16 dot product takes them."""
    fast = optimize(copy.deepcopy(model)).to(torch.bfloat16)
    assert all(_gemv_kernel(m.weight) == "gemv_bf16_panels" for m in fast.modules() if isinstance(m, KernelLinear))
    optimize(fast, weights="bf16")
    layout = "gemv_bf16_panels" if kernels().bf16_panels else "gemv_bf16"
    assert all(_gemv_kernel(m.weight) == layout for m in fast.modules() if isinstance(m, KernelLinear))


def _rounded(model):
    """The fp32 model with its Linear weights and their inputs rounded to bf16, and its LoRAs' weights (not their
    inputs): what the bf16 path must compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.bfloat16().float())
                m.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
        for name, p in ref.named_parameters():
            if _is_lora(name):
                p.copy_(_lora_rounded(p, "bf16"))
    return ref


def _steps(model, tokens):
    """Step a model through tokens [B, T] from a random state: (logits of the last step, final state).
    Every step must leave the state it was given as it was (callers keep and fork states)."""
    g = torch.Generator().manual_seed(tokens.shape[0])
    state, given = model.init_state(tokens.shape[0]).map(lambda t: torch.randn(t.shape, generator=g).to(t.dtype)), []
    with torch.no_grad():
        for t in tokens.T:
            given.append((state, state.clone()))
            logits, state = model.step(t, state)
    for kept, snapshot in given:
        assert all(torch.equal(a, b) for a, b in zip(kept.tensors().values(), snapshot.tensors().values())), \
            "a step wrote into the state it was given"
    return logits, state


@pytest.mark.parametrize("lora", [5, 16])
@pytest.mark.parametrize("batch", [1, 5, 16, 35])
def test_fp32_steps_match_the_plain_model(batch, lora):
    """Decode steps in the fused C step, LoRA ranks of any size (5: no multiple of any vector width), batch sizes
    over every tile of the kernel and above the C step's slice of 16 sequences (17, 35: in slices)."""
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=lora, iclr_lora=lora,
                     value_lora=lora, gate_lora=2 * lora)
    model = random_model(cfg, seed=lora)
    fast = optimize(copy.deepcopy(model))
    assert all(type(block) is StepBlock for block in fast.blocks) and _gemv_kernel(fast.head.weight) == "gemv_f32_panels"
    tokens = torch.randint(0, 300, (batch, 6), generator=torch.Generator().manual_seed(batch))
    out_fast, s_fast = _steps(fast, tokens)
    out_ref, s_ref = _steps(model, tokens)
    assert_close(out_fast, out_ref, 1e-5, "step logits")
    for name, a in s_fast.tensors().items():
        assert_close(a, s_ref.tensors()[name], 1e-5, name)


@pytest.mark.parametrize("through", ["model_step", "block_step"])
@pytest.mark.parametrize("weights", [None, "bf16"])
@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17])
def test_block_steps_match_the_plain_model(batch, weights, through, monkeypatch):
    """Decode steps in one C call for the whole model (StepRWKV) or one a block (StepBlock, where the model's own
    step does not fit) against model.py, logits and every state tensor: three layers (ln0 and v_first made by the
    first, mixed in by the others), LoRA ranks that differ, fp32 and bf16 Linear weights (the reference then has
    the same weights rounded to bf16)."""
    cfg = RWKVConfig(vocab_size=300, n_layer=3, n_embd=128, head_size=32, decay_lora=16, iclr_lora=32, value_lora=16,
                     gate_lora=48)
    model = random_model(cfg, seed=batch)
    fast = optimize(copy.deepcopy(model), weights=weights)
    assert all(type(block) is StepBlock for block in fast.blocks) and type(fast) is StepRWKV
    if through == "block_step":
        monkeypatch.setattr(StepRWKV, "forward", RWKV.forward)
    calls = _counting(monkeypatch, through)
    tokens = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(batch))
    ref = model if weights is None else _rounded(model)
    out_fast, s_fast = _steps(fast, tokens)
    out_ref, s_ref = _steps(ref, tokens)
    check = (lambda a, b, name: assert_close(a, b, 1e-5, name)) if weights is None else assert_bf16_close
    check(out_fast, out_ref, "step logits")
    with torch.no_grad():  # from the zero state the recurrence's outputs are small, and ln_x's eps shows
        check(fast.step(tokens[:, 0])[0], ref.step(tokens[:, 0])[0], "first step logits")
    for name, a in s_fast.tensors().items():
        check(a, s_ref.tensors()[name], name)
    assert calls, f"the steps ran in {through}"


@pytest.mark.parametrize("weights", [None, "bf16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3, 16, 17])
def test_model_step_is_the_blocks_steps(batch, weights, monkeypatch):
    """StepRWKV's one C call gives the logits and state bits the blocks' own C steps give one by one (the same
    operations), at every weight type and across the C step's slice of 16 sequences (17: slices). The state it was given is left as it was."""
    cfg = RWKVConfig(vocab_size=300, n_layer=3, n_embd=128, head_size=32, decay_lora=16, iclr_lora=32, value_lora=16,
                     gate_lora=48)
    fast = optimize(random_model(cfg, seed=batch), weights=weights)
    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, 300, (batch, 1), generator=g)
    state = fast.init_state(batch).map(lambda t: torch.randn(t.shape, generator=g))
    snapshot = state.clone()
    calls = _counting(monkeypatch, "model_step")
    with torch.no_grad():
        logits, new = fast(tokens, state)
        by_blocks, by_blocks_state = RWKV.forward(fast, tokens, state)
    assert calls == ["model_step"]
    for name, t in new.tensors().items():
        assert torch.equal(t, by_blocks_state.tensors()[name]), name
    assert torch.equal(logits, by_blocks)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), snapshot.tensors().values()))


def test_model_step_refuses_ids_outside_the_vocabulary(model, monkeypatch):
    """StepRWKV's steps and last_only prompts leave the ids' range check to its C call (no torch op a step): an id
    outside the vocabulary, at either end and anywhere in the batch, gets model.py's ValueError from that call,
    and the state given is left as it was."""
    fast = optimize(copy.deepcopy(model))
    calls = _counting(monkeypatch, "model_step")
    state = fast.init_state(2).map(lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
    snapshot = state.clone()
    with torch.no_grad():
        for bad in (300, -1):
            with pytest.raises(ValueError, match=f"token id {bad} is outside this model's vocabulary"):
                fast.step(torch.tensor([5, bad]), state)
            with pytest.raises(ValueError, match=f"token id {bad} is outside"):
                fast(torch.tensor([[1, 2, 3], [4, bad, 6]]), state, last_only=True)
        fast.step(torch.tensor([0, 299]), state)  # (the ends of the range)
    assert calls == ["model_step"] * 5
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), snapshot.tensors().values()))


@pytest.mark.parametrize("weights", [None, "bf16", "int8", "int4"])
@pytest.mark.parametrize("batch, length", [(1, 2), (1, 33), (3, 21), (1, 150), (5, 30), (20, 3), (65, 2)])
def test_a_last_only_prompt_in_model_step_is_the_blocks_prompt(batch, length, weights, monkeypatch):
    """A last_only prompt runs in model_step, one call per MAX_DECODE_ROWS rows (150 tokens: 64 + 64 + 22; 5 x 30:
    pieces of 12 tokens; 20 x 3: pieces of 3; 65 x 2: pieces of one token, the C's slices of 16), and gives the last tokens' logits and the state bits the blocks' own C calls give
    (RWKV.forward), at every weight type. The state it was given is left as it was."""
    cfg = RWKVConfig(vocab_size=300, n_layer=3, n_embd=128, head_size=32, decay_lora=16, iclr_lora=32, value_lora=16,
                     gate_lora=48)
    fast = optimize(random_model(cfg, seed=length), weights=weights)
    g = torch.Generator().manual_seed(batch * 1000 + length)
    tokens = torch.randint(0, 300, (batch, length), generator=g)
    state = fast.init_state(batch).map(lambda t: torch.randn(t.shape, generator=g))
    snapshot = state.clone()
    calls = _counting(monkeypatch, "model_step")
    with torch.no_grad():
        logits, new = fast(tokens, state, last_only=True)
        by_blocks, by_blocks_state = RWKV.forward(fast, tokens, state, last_only=True)
    piece = max(1, MAX_DECODE_ROWS // batch)
    assert len(calls) == -(-length // piece), "one call per piece of up to MAX_DECODE_ROWS rows"
    for name, t in new.tensors().items():
        assert torch.equal(t, by_blocks_state.tensors()[name]), name
    assert logits.shape == by_blocks.shape == (batch, 1, 300) and torch.equal(logits, by_blocks)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), snapshot.tensors().values()))


def test_a_state_of_other_shapes_never_reaches_the_c(monkeypatch):
    """The C step reads every layer's state at exactly [B, C] and [B, H, N, N]: a state whose later layer differs
    (check_state looks at the first) goes to RWKV.forward, which refuses it as torch does, where the C would have
    read past the tensor."""
    cfg = RWKVConfig(vocab_size=300, n_layer=3, n_embd=64, head_size=32)
    fast = optimize(random_model(cfg, seed=5))
    tokens = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(5))
    state = fast.init_state(3).map(lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(6)))
    state.layers[2].att_shift = state.layers[2].att_shift[:1]  # [1, C]
    calls = _counting(monkeypatch, "model_step")
    with torch.no_grad():
        for args in ((tokens, state), (tokens[:, :1], state)):  # a prompt, a step
            for forward in (fast, lambda *a, **k: RWKV.forward(fast, *a, **k)):
                with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
                    forward(*args, last_only=True)
    assert not calls


def test_model_step_gives_way(model, monkeypatch):
    """Where the one-call step would skip something (a hook in a block, a Linear replaced in one, gradients wanted)
    the model runs RWKV.forward, hooks and all, and steps in one C call again once that is gone."""
    fast = optimize(copy.deepcopy(model))
    tokens = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(3))
    expected = _steps(model, tokens)[0]
    calls = _counting(monkeypatch, "model_step")
    seen = []
    for module in (fast.blocks[1].ffn.key, fast.ln_out, fast.head):  # the step runs ln_out and the head too
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert_close(_steps(fast, tokens)[0], expected, 1e-5, "with a hook")
        assert seen and not calls
        handle.remove()
        seen.clear()
    assert_close(_steps(fast, tokens)[0], expected, 1e-5, "after it")
    assert len(calls) == 3
    fast.blocks[1].__class__ = Block  # made a plain Block again (bench_cpu.py's model.py-blocks side does this)
    assert_close(_steps(fast, tokens)[0], expected, 1e-5, "a plain Block")
    with torch.no_grad():
        assert_close(fast(tokens, last_only=True)[0], model(tokens, last_only=True)[0], 1e-5, "a prompt, a plain Block")
    assert len(calls) == 3
    fast.blocks[1].__class__ = StepBlock
    fast.requires_grad_()
    logits, _ = fast.step(tokens[:, 0])
    logits.sum().backward()
    assert fast.blocks[0].att.key.weight.grad is not None and len(calls) == 3, "gradients: model.py's ops"
    fast.requires_grad_(False)
    value = torch.nn.Linear(256, 64, bias=False)
    for m in (fast, model):
        m.blocks[0].ffn.value = copy.deepcopy(value)
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "another Linear")
    assert len(calls) == 3
    head = torch.nn.Linear(64, 300, bias=False)
    for m in (fast, model):
        m.head = copy.deepcopy(head)
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "another head")
    assert len(calls) == 3


def test_the_last_norm_runs_in_the_kernels_as_the_step_does(model):
    """optimize() makes ln_out a KernelLayerNorm (the C step's own normalization, so a prompt's last token gets a
    step's bits: test_a_prompt_read_in_pieces_gets_the_bits_of_one_read): nn.LayerNorm's values on any rows,
    its gradients under autograd, and its parameters' names."""
    fast = optimize(copy.deepcopy(model))
    assert type(fast.ln_out) is KernelLayerNorm and fast.state_dict().keys() == model.state_dict().keys()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        fast.ln_out.weight.copy_(torch.randn(64, generator=g))
        fast.ln_out.bias.copy_(torch.randn(64, generator=g))
    reference = copy.deepcopy(fast.ln_out)
    reference.__class__ = torch.nn.LayerNorm
    x = torch.randn(3, 5, 64, generator=g) * 4 + 1
    with torch.no_grad():
        assert_close(fast.ln_out(x), reference(x), 1e-5, "rows")
        assert not torch.equal(fast.ln_out(x), reference(x)), "not the kernel's own operations"
    x.requires_grad_()
    fast.ln_out(x).square().sum().backward()
    mine = x.grad
    x.grad = None
    reference(x).square().sum().backward()
    assert_close(mine, x.grad, 1e-5, "gradients")


@pytest.mark.parametrize("weights", [None, "bf16", "int8", "int4"])
@pytest.mark.parametrize("batch, length", [(1, 2), (1, 17), (3, 5), (2, 32), (1, 64), (3, 30), (1, 150)])
def test_prompts_run_in_the_fused_block(batch, length, weights, monkeypatch):
    """A prompt of up to MAX_DECODE_ROWS tokens (all rows together) runs each block in one C call: its tokens
    are rows of the products, the shifts and the recurrence follow each sequence; a longer one in pieces of that
    many rows, the state carried. From a random state, its logits at every position and its final state are
    model.py's (the weights as the kernels read them), and the state it was given is left as it was."""
    cfg = RWKVConfig(vocab_size=300, n_layer=3, n_embd=128, head_size=32, decay_lora=16, iclr_lora=20, value_lora=8,
                     gate_lora=48)
    model = random_model(cfg, seed=length)
    fast = optimize(copy.deepcopy(model), weights=weights)
    ref = _dequantized(model, fast) if weights in QUANTIZED else _rounded(model) if weights else model
    calls = []
    block_step = kernels()["block_step"]
    monkeypatch.setitem(kernels(), "block_step", lambda *args: calls.append(args[11]) or block_step(*args))
    g = torch.Generator().manual_seed(batch * 100 + length)
    tokens = torch.randint(0, 300, (batch, length), generator=g)
    state = model.init_state(batch).map(lambda t: torch.randn(t.shape, generator=g))
    snapshot = state.clone()
    with torch.no_grad():
        logits, new_state = fast(tokens, state)
        ref_logits, ref_state = ref(tokens, state)
    piece = length if batch * length <= MAX_DECODE_ROWS else MAX_DECODE_ROWS // batch
    pieces = [min(piece, length - i) for i in range(0, length, piece)]
    assert calls == pieces * cfg.n_layer, "each block in C calls of up to MAX_DECODE_ROWS rows"
    check = (assert_quantized_close if weights in QUANTIZED else assert_bf16_close if weights == "bf16"
             else lambda a, b, name: assert_close(a, b, 1e-5, name))
    if weights == "bf16" and batch * length > MAX_DECODE_ROWS:
        # (the head's rows of a long prompt at every position go through torch's matmul: bf16 there rounds y too)
        assert_close(logits, ref_logits, BF16_MATMUL_RTOL, "prompt logits")
    else:
        check(logits, ref_logits, "prompt logits")
    for name, t in new_state.tensors().items():
        check(t, ref_state.tensors()[name], name)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), snapshot.tensors().values()))


def test_block_steps_with_a_nearly_vanishing_removal_key():
    """kk = normalize(k * k_k) stays a unit vector however small k * k_k is (down to F.normalize's eps 1e-12):
    one head's k_k scaled to 1e-8 must give the plain model's result in the fused step too."""
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=16, iclr_lora=16, value_lora=16,
                     gate_lora=16)
    model = random_model(cfg, seed=9)
    with torch.no_grad():
        model.blocks[1].att.k_k[..., :32] *= 1e-8
    fast = optimize(copy.deepcopy(model))
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(9))
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "step logits")


@pytest.mark.parametrize("assign", [False, True], ids=["copied-in", "assigned"])
def test_optimized_model_loads_new_weights(model, assign):
    """Weights loaded after optimize() are the ones its steps use: neither a copy made at optimize time nor the
    pointers a step before the load kept go stale."""
    other = random_model(model.config, seed=5)
    fast = optimize(copy.deepcopy(model))
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(5))
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "step logits before the load")
    fast.load_state_dict(other.state_dict(), assign=assign)  # assign: new Parameters, in nn.Linear's layouts
    assert_close(_steps(fast, tokens)[0], _steps(other, tokens)[0], 1e-5, "step logits")


def test_a_module_replaced_after_steps(model):
    """A weight given another layout in place, and a Linear swapped into a stepped block (its own weight,
    torch's layout), are what the next steps use."""
    fast = optimize(copy.deepcopy(model))
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(6))
    _steps(fast, tokens)
    for m in (fast, model):  # the same values in another layout (fp32 panels no longer contiguous): the kept
        w = m.blocks[0].att.receptance.weight  # pointers must not be used
        w.data = w.data.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "step logits after a layout change")
    replacement = torch.nn.Linear(64, 64, bias=False)
    for m in (fast, model):
        m.blocks[1].att.receptance = copy.deepcopy(replacement)
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "step logits")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_optimized_model_moved_to_another_dtype(model, dtype):
    """After .to(dtype) the kernels no longer fit: the optimized model must fall back to torch, not misread memory
    (also where steps before the move kept their parameters' pointers)."""
    fast = optimize(copy.deepcopy(model))
    tokens = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(4))
    _steps(fast, tokens)
    fast = fast.to(dtype)
    out_fast, _ = _steps(fast, tokens)
    out_ref, _ = _steps(model.to(dtype), tokens)
    assert_close(out_fast, out_ref, 1e-6 if dtype == torch.float64 else 3e-2, "step logits")


@pytest.mark.parametrize("in_features, out_features", [(48, 12), (768, 100), (64, 6), (37, 5)])
def test_fp32_linear_kernel(in_features, out_features):
    """Every batch size up to 17, 35 rows, and 65 (two passes over the weights: 33 + 32); inputs no multiple of
    the vector width or of its four chains, outputs that leave rows outside the kernel's tiles."""
    torch.manual_seed(in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    fast = KernelLinear(linear, torch.float32)
    assert _gemv_kernel(fast.weight) == "gemv_f32_panels"
    for rows in (*range(1, 18), 35, MAX_DECODE_ROWS + 1):
        x = torch.randn(rows, in_features)
        assert_close(fast(x), linear(x).detach(), 1e-6, f"{rows} rows")


@pytest.mark.parametrize("in_features, out_features", [(48, 12), (768, 100), (64, 6), (37, 5), (96, 130)])
def test_bf16_linear_kernel(in_features, out_features):
    """bf16 weights in the layout their level streams (panels, or rows where a bf16 dot product takes them) against
    fp64 on the same bf16 values, at every batch size up to 17, 35 rows and 65 (two passes); each row of a batch the
    bits it gets alone."""
    torch.manual_seed(in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    fast = KernelLinear(linear, torch.bfloat16)
    assert _gemv_kernel(fast.weight) == ("gemv_bf16_panels" if kernels().bf16_panels else "gemv_bf16")
    assert torch.equal(fast.dense_weight(), linear.weight.detach().bfloat16())
    x_all = torch.randn(MAX_DECODE_ROWS + 1, in_features)
    with torch.no_grad():
        alone = [fast(x_all[i:i + 1]) for i in range(x_all.shape[0])]
        for rows in (*range(1, 18), 35, MAX_DECODE_ROWS + 1):
            x = x_all[:rows]
            y = fast(x)
            expected = x.bfloat16().double() @ linear.weight.bfloat16().double().T
            assert_close(y, expected, BF16_RTOL, f"{rows} rows")
            for i in range(rows):
                assert torch.equal(y[i], alone[i][0]), f"row {i} of {rows}: not the bits it gets alone"


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("in_features, out_features", [(64, 768), (768, 64), (20, 128), (7, 48), (768, 20), (96, 8)])
def test_lora_kernel(weights, in_features, out_features):
    """The LoRAs' products (W [in, out] as the model holds w1, w2 ..., int8 with a scale per output) against fp64
    at every row count up to 17, 35 and 65: outputs in whole blocks of vectors, in blocks and single vectors (48 = 3
    AVX-512 vectors), vectors and scalar outputs (20), scalar outputs alone (8); each row of a batch the bits it gets
    alone (a chain per output)."""
    torch.manual_seed(in_features + out_features)
    weight = torch.randn(in_features, out_features)
    scale = None
    if weights == "int8":
        q, scale = fast_module.quantize_int8(weight.t())
        stored, dense = q.t().contiguous(), (q.double() * scale.double()[:, None]).t()
    else:
        stored = weight.to(getattr(torch, weights)).contiguous()
        dense = stored.double()
    cols = kernels()["gemv_cols"]

    def product(x):
        y = torch.empty(x.shape[0], out_features)
        assert cols(stored.data_ptr(), None if scale is None else scale.data_ptr(), WEIGHT_TYPES[weights], x.data_ptr(),
                    y.data_ptr(), out_features, in_features, x.shape[0], 2) == 0
        return y

    x_all = torch.randn(MAX_DECODE_ROWS + 1, in_features)
    alone = [product(x_all[i:i + 1].contiguous()) for i in range(x_all.shape[0])]
    for rows in (*range(1, 18), 35, MAX_DECODE_ROWS + 1):
        x = x_all[:rows].contiguous()
        y = product(x)
        # (one fp32 chain of in_features products per output: 768 of them sum to within ~2e-6)
        assert_close(y, x.double() @ dense, 1e-6 if in_features < 256 else 4e-6, f"{rows} rows")
        for i in range(rows):
            assert torch.equal(y[i], alone[i][0]), f"row {i} of {rows}: not the bits it gets alone"
    assert cols(stored.data_ptr(), None, WEIGHT_TYPES["uint8"], x_all.data_ptr(), x_all.data_ptr(), out_features,
                in_features, 1, 1) == 1, "int4 is refused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panels_take_the_kernel_at_any_row_count(monkeypatch, dtype):
    """Rows of several tokens past MAX_DECODE_ROWS (a prompt's logits at every position) go to the kernel too, in
    passes: torch's matmul would first need the panels unpacked, a copy of the weight a call."""
    if dtype == torch.bfloat16 and not kernels().bf16_panels:
        pytest.skip("bf16 weights are row-major at this level (its bf16 dot product takes them so)")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 130, bias=False)
    fast = KernelLinear(linear, dtype)
    x = torch.randn(2, MAX_DECODE_ROWS + 7, 96)
    with torch.no_grad():
        expected = (x.to(dtype).double() @ linear.weight.to(dtype).double().T).float()
    monkeypatch.setattr(fast_module.F, "linear", lambda *a: pytest.fail("torch's matmul on unpacked panels"))
    assert_close(fast(x), expected, 1e-6 if dtype == torch.float32 else BF16_RTOL, "rows of several tokens")


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_bf16_steps_compute_bf16_products(model, batch):
    fast = optimize(copy.deepcopy(model), weights="bf16")
    assert isinstance(fast.head, KernelLinear) and fast.head.weight.dtype == torch.bfloat16
    assert fast.emb.weight.dtype == torch.float32, "only Linear weights change"
    ref = _rounded(model)
    tokens = torch.randint(0, 300, (batch, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s_fast = s_ref = None
        for t in tokens.T:
            out_fast, s_fast = fast.step(t, s_fast)
            out_ref, s_ref = ref.step(t, s_ref)
    assert_bf16_close(out_fast, out_ref, "step logits")


def test_bf16_prefill_close(model):
    fast = optimize(copy.deepcopy(model), weights="bf16")
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_bf16_close(fast(tokens)[0], _rounded(model)(tokens)[0], "prefill logits")
    assert fast.state_dict().keys() == model.state_dict().keys()


def test_bad_weights_option(model):
    with pytest.raises(ValueError, match="weights must be None .*, 'bf16', 'int8' or 'int4', got 'int2'"):
        optimize(model, weights="int2")
    narrow = torch.nn.Linear(INT4_GROUP + 16, 8, bias=False)
    with pytest.raises(ValueError, match=f"int4 weights need inputs a multiple of {INT4_GROUP} wide, got a \\[8, 80\\]"):
        KernelLinear(narrow, torch.uint8)


def _dequantized(model, quantized):
    """The fp32 model with the int8 or int4 model's weights as its own (its LoRAs as they were rounded to int8):
    what the quantized path must compute (with each such Linear's input rounded as the kernels round it, at the
    levels whose kernels do)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, KernelLinear):
                ref.get_submodule(name).weight.copy_(m.dense_weight())
        for name, p in quantized.named_parameters():
            if _is_lora(name):
                ref.get_parameter(name).copy_(p)
    return _with_rounded_activations(ref)


def _is_lora(name: str) -> bool:
    """Whether a parameter name is one of the time mix's LoRA matrices (att.w1 ...)."""
    return name.rpartition(".")[2] in LORA_PARAMS


def _with_rounded_activations(ref):
    """ref (in place) with the input of each bias-free Linear rounded as the int4 and int8 kernels of this level
    round it (only at levels with int8 activations, and where the input is a multiple of ACT_GROUP wide)."""
    if kernels().int8_activations:
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear) and m.in_features % ACT_GROUP == 0:
                m.register_forward_pre_hook(lambda _, args: (round_activations(args[0]),))
    return ref


def assert_bf16_close(actual, expected, name):
    """A bf16 model's outputs against `_rounded`'s. Rows match to the sums' order (~1e-7) until an input rounds
    to the other bf16 neighbour in one of them (its fp32 value an ulp off upstream), which moves that row and,
    through the state, those after it by up to ~1e-3 of the largest magnitude. The products' own rounding is
    pinned exactly by test_bf16_products_round_activations_to_nearest_even."""
    assert_close(actual, expected, BF16_MODEL_RTOL, name)


def assert_quantized_close(actual, expected, name):
    """A quantized model's outputs against `_dequantized`'s: fp32 sums in another order (1e-5). With int8
    activations an input now and then lands on the other side of a rounding step in one of them (its fp32 value
    an ulp off upstream: another order of sums), which moves the products it feeds by a step's share and, through
    the state, the rows after it: there every row within ROUNDING_FLIP_RTOL of the largest magnitude and their
    median within 1e-4 (or all within 1e-3: a row or two), where inputs left unrounded put the median at ~5e-3."""
    if not kernels().int8_activations:
        return assert_close(actual, expected, 1e-5, name)
    assert_close(actual, expected, ROUNDING_FLIP_RTOL, name)
    rows = (actual - expected).abs().flatten(0, -2).amax(-1) / expected.abs().max()
    assert rows.median() < 1e-4 or rows.max() < 1e-3, f"{name}: rows' errors {rows.tolist()}"


ROUNDING_FLIP_RTOL = 2e-2  # (see assert_quantized_close)
# weights= -> (the stored dtype, the C weight type, the scales' shape for a [300, 128] head, how near fp32 steps stay)
QUANTIZED = {"int8": (torch.int8, 2, (300,), 3e-2), "int4": (torch.uint8, 3, (300, 128 // INT4_GROUP), 0.3)}


def quantized_type(weights: str) -> int:
    """The C weight type of a model quantized to `weights` at this level: in quads where integer products take them."""
    if getattr(kernels(), f"{weights}_quads"):
        return WEIGHT_TYPES[f"{weights}_quads"]
    return QUANTIZED[weights][1]


@pytest.mark.parametrize("weights", QUANTIZED)
@pytest.mark.parametrize("batch", [1, 6, 17])
def test_quantized_steps(batch, weights):
    """int8 weights (head included) with one scale per row, int4 with one per INT4_GROUP inputs: steps in the
    fused C step compute the dequantized model's steps in fp32, and stay near the fp32 model; so do prompts,
    short (one C call a block) and long (pieces of MAX_DECODE_ROWS rows; the head's rows in torch's matmul)."""
    dtype, _, scale_shape, rtol_fp32 = QUANTIZED[weights]
    weight_type = quantized_type(weights)
    cfg = RWKVConfig(vocab_size=300, n_layer=3, n_embd=128, head_size=32, decay_lora=16, iclr_lora=20, value_lora=8,
                     gate_lora=48)
    model = random_model(cfg, seed=batch)
    fast = optimize(copy.deepcopy(model), weights=weights)
    assert all(type(block) is StepBlock and block.step_plan.weight_type == weight_type for block in fast.blocks)
    assert fast.head.weights == dtype and fast.head.state_dict()["scale"].shape == scale_shape
    ref = _dequantized(model, fast)
    tokens = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(batch))
    out_fast, s_fast = _steps(fast, tokens)
    assert_quantized_close(out_fast, _steps(ref, tokens)[0], "step logits vs the dequantized model")
    assert_close(out_fast, _steps(model, tokens)[0], rtol_fp32, "step logits vs fp32")
    long_prompt = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        assert_quantized_close(fast(tokens)[0], ref(tokens)[0], "prompt logits")
        assert_quantized_close(fast(long_prompt)[0], ref(long_prompt)[0], "long prompt logits")


def test_int8_model_of_a_width_no_multiple_of_the_group_keeps_one_call_steps():
    """A width no multiple of ACT_GROUP (96) keeps every int8 weight row-major, its channel mix's value (384 wide)
    too: a block's C step takes one weight type, so quads there would have sent the blocks to model.py. Its steps
    and prompts still compute the dequantized model's."""
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=96, head_size=32, decay_lora=16, iclr_lora=16, value_lora=8,
                     gate_lora=16)
    model = random_model(cfg, seed=4)
    fast = optimize(copy.deepcopy(model), weights="int8")
    assert type(fast) is StepRWKV and all(type(block) is StepBlock for block in fast.blocks)
    assert {block.step_plan.weight_type for block in fast.blocks} == {WEIGHT_TYPES["int8"]}
    assert fast.blocks[0].ffn.value.weight.dim() == 2 and fast.blocks[0].ffn.value.in_features % ACT_GROUP == 0
    ref = _dequantized(model, fast)
    tokens = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    assert_quantized_close(_steps(fast, tokens)[0], _steps(ref, tokens)[0], "step logits vs the dequantized model")
    with torch.no_grad():
        assert_quantized_close(fast(tokens)[0], ref(tokens)[0], "prompt logits")


def test_int4_packing():
    """quantize_int4's layout, which the C kernels read: each 32 inputs of a row in 16 bytes, byte j holding input j
    in its low nibble and input j + 16 in its high one, a nibble n standing for (n - 8) * its group's scale; a
    group's largest magnitude is -8 steps exactly; every weight within half a step of its value (one step where
    its sign is the other one and it is clipped at +7 steps)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2 * INT4_GROUP, generator=g)
    packed, scale = quantize_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (3, INT4_GROUP) and scale.shape == (3, 2)
    nibbles = torch.stack([packed & 15, packed >> 4], -1).view(3, -1, 16, 2).transpose(2, 3).reshape(3, -1)
    by_hand = (nibbles.float() - 8) * scale.repeat_interleave(INT4_GROUP, 1)
    assert torch.equal(dequantize_int4(packed, scale), by_hand)
    groups = weight.view(3, 2, INT4_GROUP)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(scale * -8, extreme)
    step = scale.abs().repeat_interleave(INT4_GROUP, 1)
    assert ((by_hand - weight).abs() <= torch.where(nibbles == 15, step, step / 2) * (1 + 1e-6)).all()


def test_int8_quads_layout():
    """to_quads's layout, which the integer products read (tile_quads): byte [block, k, r, m] holds input 4 k + m of
    row 16 block + r as w + 128, the last block's missing rows w = 0; from_quads gives the int8 weight back."""
    weight = torch.randint(-127, 128, (37, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    quads = fast_module.to_quads(weight)
    assert quads.dtype == torch.uint8 and quads.shape == (3, 16, QUAD_ROWS, 4)
    for block, k, r, m in [(0, 0, 0, 0), (1, 5, 3, 2), (2, 15, 4, 3), (0, 7, 15, 1)]:
        assert quads[block, k, r, m].item() == weight[QUAD_ROWS * block + r, 4 * k + m].item() + 128
    assert (quads[2, :, 5:] == 128).all()  # rows 37 .. 47: zero weights
    assert torch.equal(fast_module.from_quads(quads, 37), weight)


def test_int4_quads_layout():
    """to_int4_quads's layout, which the integer products read (tile_quads): byte [block, g, j, r, m] holds input
    64 g + 4 j + m of row 16 block + r in its low nibble and input 64 g + 4 (j + 8) + m in its high one (as quantize_int4's
    nibbles), the scales [block, g, r]; the last block's missing rows w = 0; from_int4_quads gives both back."""
    weight = torch.randn(37, 2 * INT4_GROUP, generator=torch.Generator().manual_seed(0))
    packed, scale = quantize_int4(weight)
    quads, scales = fast_module.to_int4_quads(packed, scale)
    assert quads.shape == (3, 2, 8, QUAD_ROWS, 4) and scales.shape == (3, 2, QUAD_ROWS)
    halves = packed.reshape(37, -1, 16)
    nibbles = torch.cat([halves & 15, halves >> 4], -1).reshape(37, -1)  # quantize_int4's, input by input
    for block, g, j, r, m in [(0, 0, 0, 0, 0), (1, 1, 5, 3, 2), (2, 0, 7, 4, 3), (0, 1, 2, 15, 1)]:
        row, first = QUAD_ROWS * block + r, 64 * g + 4 * j + m
        assert quads[block, g, j, r, m].item() == nibbles[row, first] | nibbles[row, first + 32] << 4
        assert scales[block, g, r] == scale[row, g]
    assert (quads[2, :, :, 5:] == 0x88).all()  # rows 37 .. 47: zero weights
    back = fast_module.from_int4_quads(quads, scales, 37)
    assert torch.equal(back[0], packed) and torch.equal(back[1], scale)


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
def test_quantizers_give_the_same_values_a_chunk_of_rows_at_a_time(quantize):
    """A weight of more rows than QUANTIZE_ROWS is quantized a chunk of rows at a time (to bound the temporaries):
    each row's values and scales are those of the whole weight at once."""
    weight = torch.randn(2 * fast_module.QUANTIZE_ROWS + 37, 128, generator=torch.Generator().manual_seed(5))
    chunked, whole = quantize(weight), quantize.__wrapped__(weight)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(chunked, whole))


@pytest.mark.parametrize("weights, in_features, out_features", [
    ("int4", 64, 12), ("int4", 768, 100), ("int4", 192, 5), ("int8", 64, 12), ("int8", 768, 100), ("int8", 192, 5),
    ("int8", 100, 7)])  # (int4: one weight group per activation group, two per 64-byte load: 192 ends in half a load)
def test_quantized_linear_kernel(weights, in_features, out_features):
    """The int4 and int8 products against the dequantized weight in fp64, with the inputs as this level's kernels
    see them (at the x86 levels from avx2: rounded to int8 steps per ACT_GROUP inputs, `round_activations`; int8 inputs no
    multiple of ACT_GROUP stay fp32): every batch size up to 17, 35 rows, and 65 (two passes over the weights: 33 + 32); outputs that fill no
    tile."""
    torch.manual_seed(in_features)
    dtype = QUANTIZED[weights][0]
    fast = KernelLinear(torch.nn.Linear(in_features, out_features, bias=False), dtype)
    quads = getattr(kernels(), f"{weights}_quads") and in_features % ACT_GROUP == 0
    assert _gemv_kernel(fast.weight) == (f"gemv_i{weights[-1]}_quads" if quads else KERNEL_OF[dtype])
    dense = fast.dense_weight()
    for rows in (*range(1, 18), 35, MAX_DECODE_ROWS + 1):
        x = torch.randn(rows, in_features)
        rounds = kernels().int8_activations and in_features % ACT_GROUP == 0
        seen = round_activations(x, torch.float64) if rounds else x.double()  # (exactly what the kernels multiply)
        assert_close(fast(x), seen @ dense.double().T, 1e-6, f"{rows} rows")


@pytest.mark.parametrize("in_features, out_features", [(64, 12), (768, 100)])
def test_row_major_int8_products(in_features, out_features):
    """Row-major int8 weights (KernelLinear's quads=False: optimize's choice for a block with a width no multiple of
    ACT_GROUP) round their inputs where this level's quads do, at every tile size; at the levels with integer
    products but no VNNI (avx2, avx512) every output has the bits of the same weights in quads (each group's exact
    sum, then the same chain of FMAs)."""
    torch.manual_seed(in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    rows = KernelLinear(linear, torch.int8, quads=False)
    assert _gemv_kernel(rows.weight) == "gemv_i8"
    dense = rows.dense_weight().double()
    x = torch.randn(35, in_features)
    seen = round_activations(x, torch.float64) if kernels().int8_activations else x.double()
    same_as_quads = kernels().level in ("avx2", "avx512")
    quads = KernelLinear(linear, torch.int8) if same_as_quads else None
    for n in (1, 2, 3, 4, 5, 35):
        y = rows(x[:n])
        assert_close(y, seen[:n] @ dense.T, 1e-6, f"{n} rows")
        if same_as_quads:
            assert torch.equal(y, quads(x[:n])), f"{n} rows: not the bits of the weights in quads"


@pytest.mark.parametrize("weights", QUANTIZED)
def test_quantized_products_keep_a_nan_in_its_row(weights):
    """A NaN or inf input gives its row non-finite outputs, as an fp32 product would (int8 activations: the
    group's scale carries it), and leaves the other rows of the batch as they are alone."""
    torch.manual_seed(0)
    fast = KernelLinear(torch.nn.Linear(128, 20, bias=False), QUANTIZED[weights][0])
    x = torch.randn(5, 128)
    alone = fast(x[:1])
    x[2, 70], x[3, 5] = float("nan"), float("inf")
    y = fast(x)
    assert not y[2:4].isfinite().any() and y[[0, 1, 4]].isfinite().all()
    assert torch.equal(y[:1], alone)


def _lora_rounded(lora: torch.Tensor, weights: str) -> torch.Tensor:
    """A LoRA matrix rounded as a model with these weights keeps it: bf16, else int8 with one scale per output."""
    if weights == "bf16":
        return lora.bfloat16().float()
    int8, scale = quantize_int8(lora.t())
    return (int8.float() * scale[:, None]).t()


@pytest.mark.parametrize("weights", ["bf16", *QUANTIZED])
def test_models_round_their_loras(model, weights):
    """bf16 models keep their LoRAs in bf16, int8 and int4 ones in int8 with one scale per output: the Parameters
    hold the rounded values (so model.py computes what the kernels do), rounding them again changes no bit, and
    LoRAs loaded in place after optimize() are rounded and stepped with, not the copies from before.
    While the model is being trained nothing is rounded under the optimizer."""
    fast = optimize(copy.deepcopy(model), weights=weights)
    loras = {name: p for name, p in fast.named_parameters() if _is_lora(name)}
    assert len(loras) == 8 * len(fast.blocks) - 2  # (the first block has no value LoRA)
    for name, p in loras.items():
        assert torch.equal(_lora_rounded(p, weights), p), name
        assert torch.equal(_lora_rounded(model.get_parameter(name), weights), p), name
        assert not torch.equal(p, model.get_parameter(name)), f"{name} was not rounded"
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(7))
    other = random_model(model.config, seed=7)
    other_fast = optimize(copy.deepcopy(other), weights=weights)
    # its prepared weights, its LoRAs as they were before rounding
    sd = other_fast.state_dict() | {k: v for k, v in other.state_dict().items() if _is_lora(k)}
    for assign in (False, True):
        _steps(fast, tokens)  # (the copies of the LoRAs before the load are made and kept)
        fast.load_state_dict(sd, assign=assign)
        if assign:  # new Parameters in model.py's layouts, which take model.py's path until optimize() again
            optimize(fast, weights=weights)
        assert torch.equal(_steps(fast, tokens)[0], _steps(other_fast, tokens)[0]), f"steps after a load ({assign=})"
        state = other.init_state(2)
        assert torch.equal(fast(tokens, state)[0], other_fast(tokens, state)[0]), f"a prompt after a load ({assign=})"
        assert all(torch.equal(p, other_fast.get_parameter(name)) for name, p in fast.named_parameters())
    w1 = fast.blocks[0].att.w1.requires_grad_()  # (a quantized model's int weights cannot be trained)
    with torch.no_grad():
        w1 += 1e-3 * torch.randn(w1.shape)
    trained = w1.detach().clone()
    fast(tokens)[0].sum().backward()
    with torch.no_grad():
        fast(tokens)
    assert torch.equal(w1, trained) and w1.grad is not None


@pytest.mark.parametrize("weights", QUANTIZED)
def test_quantized_saves_and_loads_as_it_is(model, tmp_path, weights):
    """A quantized model saves in our format and loads back as it was (int8, or int4 packed), not requantized;
    fast=False dequantizes it."""
    dtype, weight_type = QUANTIZED[weights][0], quantized_type(weights)
    fast = optimize(copy.deepcopy(model), weights=weights)
    path = rwkv_lm.save(fast, tmp_path / "q.safetensors")
    loaded = rwkv_lm.load(path)
    assert loaded.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded.state_dict().values(), fast.state_dict().values()))
    assert all(type(block) is StepBlock and block.step_plan.weight_type == weight_type for block in loaded.blocks)
    assert loaded.head.weights == dtype
    plain = rwkv_lm.load(path, fast=False)
    assert type(plain.head) is torch.nn.Linear and plain.state_dict().keys() == model.state_dict().keys()
    _with_rounded_activations(plain)
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(3))
    expected = _steps(fast, tokens)[0]
    assert torch.equal(_steps(loaded, tokens)[0], expected)
    assert_quantized_close(_steps(plain, tokens)[0], expected, "dequantized steps")


def test_bf16_after_fp32_layout_and_inputs_the_dot_product_does_not_take():
    """A column-major fp32 weight still feeds the row-streaming kernel right; inputs no multiple of 32 wide (which
    avx512_bf16's dot product does not take) are widened instead, their activations rounded alike."""
    torch.manual_seed(0)
    for in_features in (128, 16448, 100):
        linear = torch.nn.Linear(in_features, 8, bias=False)
        linear.weight.data = linear.weight.data.t().contiguous().t()  # what optimize() does to fp32 weights
        x = torch.randn(3, in_features)
        expected = x.bfloat16().float() @ linear.weight.detach().bfloat16().float().T
        assert_close(KernelLinear(linear, torch.bfloat16)(x), expected, BF16_RTOL, f"in_features={in_features}")


@pytest.mark.parametrize("in_features", [64, 40])
def test_bf16_products_round_activations_to_nearest_even(in_features):
    """Activations meet bf16 weights rounded to bf16 as avx512_bf16's conversion rounds them, on every level and
    both paths (that level's dot product for inputs a multiple of 32 wide, the widening one else): ties to the
    even neighbour (1 + 2^-8 lies halfway between 1 and 1 + 2^-7 and rounds down to 1, 1 + 3 * 2^-8 up to
    1 + 2^-6), denormals to zero, every NaN kept NaN (payloads below bf16's bits too)."""
    even = torch.arange(in_features) % 2 == 0
    linear = torch.nn.Linear(in_features, 2, bias=False)
    linear.weight.data = torch.stack([even, ~even]).float()  # row 0 sums the inputs at even places, row 1 the odd
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8]).repeat(in_features // 2)
    nans = [ties.clone().index_fill_(0, torch.tensor([2]), 0.0) for _ in range(3)]
    for row, bits in zip(nans, (0x7FFFFFFF, 0x7F800001, -0x3FFFFF)):  # (the last: 0xFFC00001)
        row.view(torch.int32)[2] = bits
    x = torch.stack([ties, ties.neg(), torch.full((in_features,), 1e-40), *nans])
    y = KernelLinear(linear, torch.bfloat16)(x)
    half = in_features // 2
    assert torch.equal(y[:3], torch.tensor([[half, half * (1 + 2**-6)], [-half, -half * (1 + 2**-6)], [0.0, 0.0]]))
    assert y[3:].isnan().all(), "a NaN input makes its row's sums NaN (times a zero weight too)"


def test_optimized_model_under_autograd_keeps_the_gradient(model):
    """optimize() leaves no parameter requiring grad (steps take the kernels without torch.no_grad() too);
    requires_grad_() makes the model trainable again: it runs the torch ops and every weight gets a gradient."""
    fast = optimize(copy.deepcopy(model))
    assert not any(p.requires_grad for p in fast.parameters())
    fast.requires_grad_()
    logits, _ = fast(torch.randint(0, 300, (2, 1), generator=torch.Generator().manual_seed(3)))
    assert logits.requires_grad
    logits.sum().backward()
    assert all(p.grad is not None for name, p in fast.named_parameters() if not name.startswith("blocks.0.att.v"))


def _counting(monkeypatch, name):
    """Count the calls of one kernel from here on."""
    calls, real = [], kernels()
    counted = {**real, name: lambda *args: calls.append(name) or real[name](*args)}
    monkeypatch.setattr(fast_module, "kernels", lambda level=None: counted)
    return calls


def test_load_gives_the_fast_path(model, tmp_path, monkeypatch):
    """rwkv_lm.load prepares an fp32 RWKV-7 on the CPU for inference (fast=False: model.py's modules): its steps
    take the C model step with or without torch.no_grad() and compute what the plain model does."""
    path = rwkv_lm.save(model, tmp_path / "m.safetensors")
    loaded, plain = rwkv_lm.load(path), rwkv_lm.load(path, fast=False)
    assert all(type(b) is StepBlock for b in loaded.blocks) and type(loaded.head) is KernelLinear
    assert all(type(b) is Block for b in plain.blocks) and type(plain.head) is torch.nn.Linear
    assert all(p.requires_grad for p in plain.parameters())
    assert type(loaded) is StepRWKV and type(plain) is RWKV
    calls = _counting(monkeypatch, "model_step")
    tokens = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(6))
    state = s_ref = None
    for t in tokens.T:  # no torch.no_grad(), as the README's loop
        logits, state = loaded.step(t, state)
        expected, s_ref = plain.step(t, s_ref)
    assert len(calls) == 4, "one C call a step"
    assert_close(logits, expected.detach(), 1e-5, "step logits")


@pytest.mark.parametrize("weights", [None, "fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("file", ["ours fp32", "official bf16"])
def test_load_puts_the_files_weights_straight_into_the_prepared_layers(model, tmp_path, weights, file):
    """rwkv_lm.load takes each Linear weight of a float file straight into its kernel's layout (never the whole model
    in fp32 first): the tensors, and so the logits, are the bits of reading the plain model and preparing it."""
    path = (rwkv_lm.save(model, tmp_path / "m.safetensors") if file == "ours fp32"
            else rwkv_lm.export_official(model, tmp_path / "m.pth", dtype=torch.bfloat16))
    loaded = rwkv_lm.load(path, weights=weights)
    expected = optimize(rwkv_lm.load(path, fast=False), weights=None if weights == "fp32" else weights)
    assert type(loaded) is StepRWKV and all(type(b) is StepBlock for b in loaded.blocks)
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), expected.parameters())), "the layouts too"
    tokens = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(_steps(loaded, tokens)[0], _steps(expected, tokens)[0])


@pytest.mark.parametrize("weights", [None, "bf16", "int8", "int4"])
def test_a_loaded_model_keeps_nothing_of_its_file(model, tmp_path, weights):
    """The file's tensors are read through a memory map: a model loaded from it holds its own copies, so the file
    can be rewritten in place afterwards (an export over it, a copy onto it) and the model computes what it did."""
    path = rwkv_lm.export_official(model, tmp_path / "m.pth", dtype=torch.bfloat16)
    loaded = rwkv_lm.load(path, weights=weights)
    tokens = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(9))
    before = _steps(loaded, tokens)[0]
    with open(path, "r+b") as f:  # the same length, other bytes (a shorter file would fault the mapped pages)
        size = f.seek(0, 2)
        f.seek(0)
        f.write(bytes(size))
    assert torch.equal(_steps(loaded, tokens)[0], before)


def test_loaded_model_copies_and_pickles(tmp_path):
    """A model loaded from an official .pth (World tokenizer attached) deep-copies and pickles, and the copies step
    as the original does."""
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=64, head_size=32, decay_lora=8, iclr_lora=8, value_lora=8, gate_lora=8)
    loaded = rwkv_lm.load(rwkv_lm.export_official(random_model(cfg, seed=4), tmp_path / "m.pth", dtype=torch.float32))
    tokens = torch.tensor([1922, 33])
    with torch.no_grad():
        expected = loaded.step(tokens)[0]
        for other in (copy.deepcopy(loaded), pickle.loads(pickle.dumps(loaded))):
            assert all(type(b) is StepBlock for b in other.blocks)
            assert torch.equal(other.step(tokens)[0], expected)
            assert other.tokenizer.encode("hi there") == loaded.tokenizer.encode("hi there")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_adapters_merge_into_quantized_weights(model, weights):
    """A LoRA merged into an int8 or int4 model: each layer holds its weight plus the adapter's delta, quantized
    again with new scales (not the int8 values plus the delta cast to int8, which made a 93% error before)."""
    fast = optimize(copy.deepcopy(model), weights=weights)
    lora = LoRA(fast, rank=4)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.1)
    quantize = quantize_int8 if weights == "int8" else quantize_int4
    expected = {name: quantize(fast.get_submodule(name).dense_weight() + adapter.delta().detach())
                for name, adapter in lora.named_adapters()}
    lora.merge()
    for name, (weight, scale) in expected.items():
        layer = fast.get_submodule(name)
        stored = layer.state_dict()
        assert torch.equal(stored["weight"], weight) and torch.equal(stored["scale"], scale), name
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(8))
    plain = copy.deepcopy(model)  # the merged model's own values (its head and LoRAs rounded too) in model.py
    plain.load_state_dict(dequantize(fast.state_dict(), "the merged model"))
    assert_close(_steps(fast, tokens)[0], _steps(plain, tokens)[0], 3e-2, "step logits after merging")


def test_adapters_on_a_loaded_model(model, tmp_path):
    """LoRA adapters hooked on a loaded model's Linear layers are part of its decode steps too (the C step would
    skip the hooks, so the block runs the torch ops while they are on); merged, they are in the weights it reads."""
    path = rwkv_lm.save(model, tmp_path / "m.safetensors")
    loaded, plain = rwkv_lm.load(path), rwkv_lm.load(path, fast=False)
    adapters = [LoRA(loaded, rank=4), LoRA(plain, rank=4)]
    with torch.no_grad():
        for p in adapters[0].parameters():
            p.normal_(0, 0.1)
    adapters[1].load_state_dict(adapters[0].state_dict())
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(7))
    out_adapted = _steps(loaded, tokens)[0]
    assert_close(out_adapted, _steps(plain, tokens)[0], 1e-5, "step logits with adapters")
    assert rel_err(out_adapted, _steps(model, tokens)[0]) > 1e-3, "the adapters change the logits"
    for lora in adapters:
        lora.merge()
    assert_close(_steps(loaded, tokens)[0], _steps(plain, tokens)[0], 1e-5, "step logits after merging")


def test_optimize_again_with_bf16_weights(model, tmp_path):
    """What the CLI does: optimize(load(path), weights="bf16") converts the fp32 kernels' weights and prepares the
    fused steps for them."""
    fast = optimize(rwkv_lm.load(rwkv_lm.save(model, tmp_path / "m.safetensors")), weights="bf16")
    assert all(m.weight.dtype == torch.bfloat16 for m in fast.modules() if isinstance(m, torch.nn.Linear))
    assert all(type(b) is StepBlock and torch.bfloat16 in b.step_plan.dtypes for b in fast.blocks)
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(9))
    assert_bf16_close(_steps(fast, tokens)[0], _steps(_rounded(model), tokens)[0], "step logits")


def test_without_a_c_compiler(model, monkeypatch):
    """Where the kernels cannot be built, optimize() keeps the plain blocks, stores fp32 weights column-major for
    BLAS, and the model computes what it did."""
    monkeypatch.setattr(fast_module, "kernels", lambda isa=None: {})
    fast = optimize(copy.deepcopy(model))
    assert not any(isinstance(m, (KernelLinear, StepBlock)) for m in fast.modules())
    assert not fast.head.weight.is_contiguous(), "stored column-major for BLAS"
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(8))
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "step logits")


def test_a_compiler_without_openmp(isa, refusing_compiler):
    """Apple's clang has no -fopenmp: the kernels are built without it and every loop, the main thread's too, runs
    on their own threads, with the bits of the OpenMP build."""
    from rwkv_lm.ops import cpu_kernels

    if isa != "generic":
        pytest.skip("the threads do not depend on the level: built at one only (a build takes seconds)")

    fast = _pool_model(None)
    tokens = torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = _steps_from(fast, tokens)
        calls = refusing_compiler("-fopenmp", "clang: error: unsupported option '-fopenmp'")
        cpu_kernels._build.cache_clear()
        assert kernels(), "no kernels without -fopenmp"
        tried = calls.read_text().splitlines()
        assert len(tried) == 2 and "-fopenmp" in tried[0] and "-fopenmp" not in tried[1]
        assert torch.equal(_steps_from(fast, tokens), expected), "the build without OpenMP gives other logits"
    finally:
        torch.set_num_threads(threads)
        cpu_kernels._build.cache_clear()


@pytest.mark.parametrize("weights", [None, "bf16", "int8", "int4"])
def test_rows_of_a_batch_get_the_bits_they_get_alone(weights):
    """Batch invariance (a seeded request samples the same text among any others): three decode steps of each
    sequence in batches of every tile shape, above MAX_BATCH (slices) and above MAX_DECODE_ROWS (the head's
    rows), give each row the logits and state it gets alone, bit for bit."""
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=128, head_size=32, decay_lora=16, iclr_lora=20, value_lora=8,
                     gate_lora=48)
    fast = optimize(random_model(cfg, seed=11), weights=weights)
    widest = 70
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 300, (widest, 3), generator=g)
    states = fast.init_state(widest).map(lambda t: torch.randn(t.shape, generator=g))

    def steps(rows):
        state = states.map(lambda t: t[rows].contiguous())
        with torch.no_grad():
            for t in tokens[rows].T:
                logits, state = fast.step(t, state)
        return logits, state

    alone = [steps(slice(i, i + 1)) for i in range(widest)]
    for batch in (2, 5, 6, 7, 16, 17, 40, widest):
        logits, state = steps(slice(0, batch))
        for i in range(batch):
            assert torch.equal(logits[i], alone[i][0][0]), f"row {i} of a batch of {batch}: logits differ from alone"
            for name, t in state.tensors().items():  # ([batch, ...] each)
                assert torch.equal(t[i], alone[i][1].tensors()[name][0]), f"row {i} of a batch of {batch}: {name}"


@pytest.mark.parametrize("weights", [None, "bf16", "int8", "int4"])
def test_a_prompt_read_in_pieces_gets_the_bits_of_one_read(weights):
    """The serving engine reads a prompt in pieces where its token budget and its state cache say: any split
    (past MAX_DECODE_ROWS too) gives the last position's logits and the state of one read, bit for bit."""
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=128, head_size=32, decay_lora=16, iclr_lora=20, value_lora=8,
                     gate_lora=48)
    fast = optimize(random_model(cfg, seed=12), weights=weights)
    prompt = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        whole, whole_state = fast(prompt, last_only=True)
        for cuts in ((1,), (37,), (64, 65), (100, 149)):
            state, start = None, 0
            for end in (*cuts, prompt.shape[1]):
                logits, state = fast(prompt[:, start:end], state, last_only=True)
                start = end
            assert torch.equal(logits, whole), f"read in pieces at {cuts}: logits differ"
            assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), whole_state.tensors().values())), \
                f"read in pieces at {cuts}: the state differs"


def _pool_model(weights):
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=128, head_size=32, decay_lora=16, iclr_lora=20, value_lora=8,
                     gate_lora=48)
    return optimize(random_model(cfg, seed=13), weights=weights)


def _steps_from(model, tokens):
    with torch.no_grad():
        logits, state = model(tokens[:, :-1], last_only=True)  # a prompt, then a step
        logits, state = model.step(tokens[:, -1], state)
    return logits


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # (the products of this model split between threads from 2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("weights", [None, "int4"])
def test_kernels_in_other_threads_give_the_main_threads_bits(weights, two_threads):
    """Outside the main thread the kernels split their loops on their own workers (OpenMP's would wait asleep
    there: see `parallel` in cpu_kernels.c), and one caller at a time has them: steps in three threads at once
    (the others then run alone) give each row the bits of the main thread's, and none waits forever."""
    from concurrent.futures import ThreadPoolExecutor

    fast = _pool_model(weights)
    inputs = [torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    expected = [_steps_from(fast, tokens) for tokens in inputs]
    with ThreadPoolExecutor(3) as threads:
        for _ in range(3):
            got = list(threads.map(lambda tokens: _steps_from(fast, tokens), inputs, timeout=120))
            for i, (a, b) in enumerate(zip(got, expected)):
                assert torch.equal(a, b), f"input {i}: another thread's logits differ from the main thread's"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_kernels_in_a_thread_of_a_forked_child(two_threads):
    """A child forked after the kernels' workers started has none of them: its threads start their own instead of
    waiting forever for the parent's (a server's workers are forked so)."""
    import threading
    import time

    fast = _pool_model(None)
    tokens = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = []
    worker = threading.Thread(target=lambda: expected.append(_steps_from(fast, tokens)))  # the workers start
    worker.start(), worker.join()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # (the child: the same steps in a new thread; the logits back through the pipe)
        try:
            got = []
            thread = threading.Thread(target=lambda: got.append(_steps_from(fast, tokens)))
            thread.start(), thread.join()
            os.write(write, pickle.dumps(got[0]))
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 120
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(child, 9)
            pytest.fail("the forked child's step never ended: it waited for workers it does not have")
        time.sleep(0.05)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    assert data, "the forked child's step failed"
    assert torch.equal(pickle.loads(data), expected[0]), "the forked child's logits differ from the parent's"


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            span = line.split(" ", 1)[0]
            if "-" in span and all(c in "0123456789abcdef-" for c in span):
                low, high = (int(a, 16) for a in span.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return []


def test_big_weights_lie_on_huge_pages(isa):
    """An fp32 weight (or bf16 one in panels) of 2 MiB or more is copied to memory advised for huge pages (one TLB entry per 2 MiB as a step
    streams it), from a 2 MiB boundary; its values, its layer's output, copies and pickles are what they were, and a
    small weight is not advised onto them."""
    import mmap

    if isa != "generic":
        pytest.skip("the placement does not depend on the level: tested at one")
    if not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        pytest.skip("no transparent huge pages to ask for here (a Linux kernel built with them)")
    big, small = nn.Linear(1024, 1024, bias=False), nn.Linear(64, 64, bias=False)
    layer, small_layer = KernelLinear(big, torch.float32), KernelLinear(small, torch.float32)
    for linear, made in ((big, layer), (small, small_layer)):
        assert torch.equal(made.dense_weight(), linear.weight)
        x = torch.randn(3, linear.in_features)
        assert_close(made(x), linear(x), 1e-5, "output")
    address = layer.weight.data_ptr()
    assert address % HUGE_PAGE == 0 and "hg" in _vm_flags(address), _vm_flags(address)
    assert layer.weight.untyped_storage().nbytes() == layer.weight.nbytes, "no slack in the storage"
    for copied in (copy.deepcopy(layer.weight), pickle.loads(pickle.dumps(layer.weight))):
        assert torch.equal(copied, layer.weight) and copied.untyped_storage().nbytes() == copied.nbytes
    assert "hg" not in _vm_flags(small_layer.weight.data_ptr()), "a weight under one huge page advised onto them"
    int4 = KernelLinear(big, torch.uint8).weight  # (int4 decoded slower on them: only panels move)
    assert "hg" not in _vm_flags(int4.data_ptr())
    bf16 = KernelLinear(big, torch.bfloat16).weight  # (the generic level keeps bf16 in panels)
    assert bf16.dim() == 3 and "hg" in _vm_flags(bf16.data_ptr()), "bf16 panels not on huge pages, as fp32 ones are"


@pytest.mark.parametrize("weights", [None, "bf16", "int8", "int4"])
def test_parameter_counts_do_not_change_when_prepared(isa, model, weights):
    """num_params() counts a Linear's in x out however the runtime stores its weight: fp32 panels pad the
    300-token head to 320 rows, int4 packs two weights a byte."""
    if isa != "generic":
        pytest.skip("the count does not depend on the level: tested at one")
    fast = optimize(copy.deepcopy(model), weights=weights)
    stored = sum(p.numel() for p in fast.parameters())
    assert stored != model.num_params() or weights in ("bf16", "int8"), "(the layout this test is about)"
    assert fast.num_params() == model.num_params() == sum(p.numel() for p in model.parameters())
    assert fast.num_params(include_embedding=False) == model.num_params(include_embedding=False)
