"""Parity with the official runtime: the `rwkv` pip package (0.8.x, RWKV_x070, 'cpu fp32') is the oracle."""
import importlib
import os

import pytest
import torch

import rwkv_lm
from rwkv_lm.testing import random_model

from conftest import assert_close


@pytest.fixture(scope="module")
def official_rwkv():
    """The `rwkv` package's model class; it reads RWKV_V7_ON when rwkv.model is first imported."""
    pytest.importorskip("rwkv", reason="the rwkv pip package is a test dependency: pip install 'rwkv==0.8.*'")
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    module = importlib.import_module("rwkv.model")
    if not hasattr(module, "RWKV_x070"):
        pytest.fail("rwkv.model was imported before RWKV_V7_ON=1 was set; run this test in its own process")
    return module.RWKV


def official_layout(V, C, L, N, lora=(8, 8, 4, 12), ffn=None, seed=0):
    """A random checkpoint written from the documented official layout (not from our model's state_dict)."""
    g = torch.Generator().manual_seed(seed)
    dw, da, dv, dg = lora
    F = ffn or 4 * C
    H = C // N

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    def mat(rows, cols):
        return rnd(rows, cols, scale=cols**-0.5)

    sd = {"emb.weight": rnd(V, C), "head.weight": mat(V, C),
          "ln_out.weight": rnd(C, scale=0.1, offset=1), "ln_out.bias": rnd(C, scale=0.1),
          "blocks.0.ln0.weight": rnd(C, scale=0.1, offset=1), "blocks.0.ln0.bias": rnd(C, scale=0.1)}
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = rnd(C, scale=0.1, offset=1), rnd(C, scale=0.1)
        for mix in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[p + "att." + mix] = torch.rand(1, 1, C, generator=g)
        sd[p + "att.w0"], sd[p + "att.w1"], sd[p + "att.w2"] = rnd(1, 1, C, offset=-1), mat(C, dw), mat(dw, C)
        sd[p + "att.a0"], sd[p + "att.a1"], sd[p + "att.a2"] = rnd(1, 1, C), mat(C, da), mat(da, C)
        sd[p + "att.v0"], sd[p + "att.v1"], sd[p + "att.v2"] = rnd(1, 1, C), mat(C, dv), mat(dv, C)
        sd[p + "att.g1"], sd[p + "att.g2"] = mat(C, dg), mat(dg, C)
        sd[p + "att.k_k"], sd[p + "att.k_a"] = rnd(1, 1, C, scale=0.2, offset=0.7), rnd(1, 1, C, scale=0.2, offset=1)
        sd[p + "att.r_k"] = rnd(H, N, scale=0.1)
        for lin in ("receptance", "key", "value", "output"):
            sd[p + f"att.{lin}.weight"] = mat(C, C)
        sd[p + "att.ln_x.weight"], sd[p + "att.ln_x.bias"] = rnd(C, scale=0.1, offset=1), rnd(C, scale=0.1)
        sd[p + "ffn.x_k"] = torch.rand(1, 1, C, generator=g)
        sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = mat(F, C), mat(C, F)
    return sd


def official_logits(RWKV, pth_path, tokens):
    """(whole-sequence logits [T, V], token-by-token logits [T, V]) from the official runtime."""
    model = RWKV(model=str(pth_path)[: -len(".pth")], strategy="cpu fp32")
    whole, _ = model.forward(tokens, None, full_output=True)
    state, stepped = None, []
    for t in tokens:
        out, state = model.forward([t], state)
        stepped.append(out.clone())
    return whole, torch.stack(stepped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_checkpoint_matches_rwkv_pip(tmp_path, official_rwkv, dtype):
    sd = official_layout(V=503, C=128, L=3, N=64, seed=1)
    path = tmp_path / "official.pth"
    torch.save({k: v.to(dtype) for k, v in sd.items()}, path)
    tokens = torch.randint(0, 503, (41,), generator=torch.Generator().manual_seed(2)).tolist()

    ref_whole, ref_steps = official_logits(official_rwkv, path, tokens)
    ours = rwkv_lm.load(path)  # fp32 compute on the file's values, as 'cpu fp32' does
    with torch.no_grad():
        logits, _ = ours(torch.tensor([tokens]))
        state, steps = None, []
        for t in tokens:
            out, state = ours.step(torch.tensor([t]), state)
            steps.append(out[0])
    assert_close(logits[0], ref_whole, 1e-4, "whole-sequence logits")
    assert_close(torch.stack(steps), ref_steps, 1e-4, "token-by-token logits")


def test_exported_model_runs_in_rwkv_pip(tmp_path, official_rwkv):
    cfg = rwkv_lm.RWKVConfig(vocab_size=300, n_layer=2, n_embd=128, head_size=64, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=12)
    model = random_model(cfg, seed=7)
    path = rwkv_lm.export_official(model, tmp_path / "exported.pth", dtype=torch.float32)
    tokens = torch.randint(0, 300, (29,), generator=torch.Generator().manual_seed(3)).tolist()
    ref_whole, ref_steps = official_logits(official_rwkv, path, tokens)
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    assert_close(logits[0], ref_whole, 1e-4, "whole-sequence logits")
    assert_close(logits[0], ref_steps, 1e-4, "token-by-token logits")


def official_state_from_file(pth_path, n_embd):
    """The x070 runtime's state list (per layer: att shift [C], WKV [H, N, N], ffn shift [C]) started from an
    official state file, the matrix taken as it is (the runtime has no loader of its own for x070 files)."""
    sd = torch.load(pth_path, map_location="cpu", weights_only=True)
    state = []
    for i in range(len(sd)):
        state += [torch.zeros(n_embd), sd[f"blocks.{i}.att.time_state"].float().clone(), torch.zeros(n_embd)]
    return state


def test_exported_state_file_starts_rwkv_pip_as_it_starts_our_chat_session(tmp_path, official_rwkv, world):
    from rwkv_lm.serve import prefill

    cfg = rwkv_lm.RWKVConfig(vocab_size=65536, n_layer=2, n_embd=64, head_size=32, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    model = random_model(cfg, seed=11)
    g = torch.Generator().manual_seed(12)
    wkv = [torch.randn(cfg.n_head, cfg.head_size, cfg.head_size, generator=g) for _ in range(cfg.n_layer)]  # not symmetric
    state_file = rwkv_lm.save_state(wkv, tmp_path / "tuned.pth")
    pth = rwkv_lm.export_official(model, tmp_path / "model.pth", dtype=torch.float32)

    session = rwkv_lm.ChatSession(model, world, system="You are a pirate.", state=state_file)
    system = world.encode("System: You are a pirate.\n\n")
    reference = official_rwkv(model=str(pth)[: -len(".pth")], strategy="cpu fp32")
    ref_logits, ref_state = reference.forward(system, official_state_from_file(state_file, cfg.n_embd))
    for i, layer in enumerate(session.state.layers):
        assert_close(layer.wkv[0], ref_state[3 * i + 1], 1e-4, f"layer {i} state after the system prompt")
    reply = world.encode("User: hi\n\nAssistant:")
    ours = prefill(model, reply, session.state)[0][0]
    theirs = reference.forward(reply, ref_state)[0]
    assert_close(ours, theirs, 1e-4, "logits after the system prompt and a user turn")

    # the orientation matters: the transposed matrices give other logits
    transposed = rwkv_lm.save_state([s.transpose(1, 2) for s in wkv], tmp_path / "transposed.pth")
    wrong = rwkv_lm.ChatSession(model, world, system="You are a pirate.", state=transposed)
    assert (prefill(model, reply, wrong.state)[0][0] - theirs).abs().max() > 1e-2


def test_lora_merged_export_runs_in_rwkv_pip_as_our_model_with_adapters(tmp_path, official_rwkv):
    from rwkv_lm.lora import LoRA

    cfg = rwkv_lm.RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    model = random_model(cfg, seed=13)
    lora = LoRA(model, rank=4, alpha=8.0)
    with torch.no_grad():  # B starts at zero; give the adapters something to add
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    tokens = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(14)).tolist()
    with torch.no_grad():
        adapted = model(torch.tensor([tokens]))[0][0]
        lora.remove()
        plain = model(torch.tensor([tokens]))[0][0]
    assert (adapted - plain).abs().max() > 1e-2  # the adapters change the logits
    lora.merge()
    ref_whole, ref_steps = official_logits(official_rwkv, rwkv_lm.export_official(model, tmp_path / "merged.pth", dtype=torch.float32), tokens)
    assert_close(ref_whole, adapted, 1e-4, "whole-sequence logits")
    assert_close(ref_steps, adapted, 1e-4, "token-by-token logits")
