"""llama.cpp runs the GGUF files we write: its first 16 greedy tokens equal ours and the official `rwkv` package's
(f32), on a World-vocabulary model and on the default model with its BPE tokenizer. Skips where llama.cpp's tools
are not built (`python bench/llamacpp.py` builds them; `make test` does it once)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_lm
from rwkv_lm import RWKVConfig
from rwkv_lm.testing import random_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import llamacpp  # noqa: E402

pytestmark = pytest.mark.skipif(llamacpp.built() is None,
                                reason=f"llama.cpp is not built in {llamacpp.CACHE} (python bench/llamacpp.py)")
N = 16

# The official runtime reads RWKV_V7_ON when rwkv.model is imported, so it runs in its own process; it takes ids.
OFFICIAL_GREEDY_IDS = r"""
import json, os, sys
os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "0"
from rwkv.model import RWKV
path, n, prompt = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
out, state = model.forward(prompt, None)
tokens = []
for _ in range(n):
    tokens.append(int(out.argmax()))
    out, state = model.forward([tokens[-1]], state)
print(json.dumps(tokens))
"""


def official_greedy(model, tmp_path, prompt: list[int], n: int) -> list[int]:
    pytest.importorskip("rwkv", reason="the official rwkv package (the oracle) is in the dev extra")
    pth = rwkv_lm.export_official(model, tmp_path / "m.pth", dtype=torch.float32)
    done = subprocess.run([sys.executable, "-c", OFFICIAL_GREEDY_IDS, str(pth), str(n), json.dumps(prompt)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_three_agree(model, tmp_path, prompt):
    path = rwkv_lm.export_gguf(model, tmp_path / "m.gguf", type="f32")
    ours = llamacpp.ours_greedy(rwkv_lm.load(path), prompt, N)
    theirs = llamacpp.greedy(path, prompt, N)
    official = official_greedy(model, tmp_path, prompt, N)
    assert theirs == ours, f"llama.cpp {theirs}\nours      {ours}"
    assert official == ours, f"rwkv pip  {official}\nours      {ours}"


def test_world_model(tmp_path, world):
    cfg = RWKVConfig(vocab_size=65536, n_layer=3, n_embd=128, head_size=64, decay_lora=32, iclr_lora=32, value_lora=32,
                     gate_lora=64)
    model = random_model(cfg, seed=21)
    model.tokenizer = world
    check_three_agree(model, tmp_path, world.encode("The Eiffel tower is in the city of"))


def test_default_model_with_its_bpe_tokenizer(tmp_path):
    model = rwkv_lm.load(REPO / "demo" / "models" / "rwkv7.safetensors", fast=False)
    check_three_agree(model, tmp_path, model.tokenizer.encode("Once upon a time, in a small village,"))


def test_llama_cpps_converter_on_our_hf_folder_writes_our_gguf(tmp_path, world):
    """llama.cpp's own convert_hf_to_gguf.py, given the fla-hub folder we write, makes the tensors our GGUF writer
    makes, bit for bit (layer 0's unused value-residual placeholders aside: it copies the iclr LoRA there, we
    write zeros), and the same World vocabulary."""
    pytest.importorskip("transformers", reason="llama.cpp's converter imports transformers")
    import gguf
    import numpy as np

    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=128, head_size=64, decay_lora=32, iclr_lora=32, value_lora=32,
                     gate_lora=64)
    model = random_model(cfg, seed=2)
    folder = rwkv_lm.export_hf(model, tmp_path / "hf", tokenizer=world)
    ours = gguf.GGUFReader(rwkv_lm.export_gguf(model, tmp_path / "ours.gguf", tokenizer=world, type="f32"))
    done = subprocess.run([sys.executable, str(llamacpp.CACHE / "src" / "convert_hf_to_gguf.py"), str(folder),
                           "--outfile", str(tmp_path / "theirs.gguf"), "--outtype", "f32"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = gguf.GGUFReader(tmp_path / "theirs.gguf")
    a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert a.keys() == b.keys()
    placeholders = {f"blk.0.time_mix_v{i}.weight" for i in range(3)}
    for name in a.keys() - placeholders:
        assert list(a[name].shape) == list(b[name].shape) and a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(a[name].data, b[name].data), name
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "rwkv7.wkv.head_size",
                "rwkv7.attention.gate_lora_rank", "rwkv7.feed_forward_length", "rwkv7.attention.layer_norm_epsilon"):
        assert ours.get_field(key).contents() == theirs.get_field(key).contents(), key
