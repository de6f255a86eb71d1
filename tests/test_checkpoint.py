"""Our format and official .pth files: round trips, and a clear error for every kind of bad file."""
import copy
import os
import pickle

import pytest
import torch

import rwkv_lm
from rwkv_lm import CheckpointError, RWKVConfig
from rwkv_lm.checkpoint import atomic_write
from rwkv_lm.runtime import prepare
from rwkv_lm.testing import random_model

from conftest import assert_close


@pytest.fixture
def tokens():
    return torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(5))


def test_save_load_round_trip(tmp_path, tiny_model, tokens):
    path = rwkv_lm.save(tiny_model, tmp_path / "m.safetensors")
    loaded = rwkv_lm.load(path, fast=False)  # bit for bit: model.py's ops (the fast path is tested in test_fast)
    assert loaded.config == tiny_model.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], tiny_model(tokens)[0])
    assert rwkv_lm.load(path, dtype=torch.bfloat16).emb.weight.dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "temporary files left behind"
    umask = os.umask(0o022)
    try:
        assert rwkv_lm.save(tiny_model, tmp_path / "n.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_official_round_trip_fp32_and_bf16(tmp_path, tiny_model, tokens):
    path = rwkv_lm.export_official(tiny_model, tmp_path / "m.pth", dtype=torch.float32)
    sd = torch.load(path, weights_only=True)
    assert sd["blocks.0.att.x_r"].shape == (1, 1, 64) and sd["blocks.0.att.r_k"].shape == (4, 16)
    assert sd["blocks.0.att.v1"].shape == (64, 4), "layer 0 carries the official (unused) value-residual tensors"
    loaded = rwkv_lm.load(path, fast=False)
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], tiny_model(tokens)[0])
    bf16 = rwkv_lm.load(rwkv_lm.export_official(tiny_model, tmp_path / "b.pth"))
    with torch.no_grad():
        assert_close(bf16(tokens)[0], tiny_model(tokens)[0], 5e-2, "bf16 export")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_official_export_of_a_quantized_model_dequantizes_it(tmp_path, tiny_model, tokens, weights):
    """The official layout has no scales: an int8 or int4 model goes out as the float weights it computes with
    (before, its int8 values went out cast as they were, the scales beside them)."""
    fast = prepare(copy.deepcopy(tiny_model), weights=weights)
    path = rwkv_lm.export_official(fast, tmp_path / "q.pth", dtype=torch.float32)
    sd = torch.load(path, weights_only=True)
    assert not any(k.endswith(".scale") for k in sd) and sd["head.weight"].dtype == torch.float32
    assert torch.equal(sd["head.weight"], fast.head.dense_weight())
    plain = rwkv_lm.load(path, fast=False)
    with torch.no_grad():
        assert_close(plain(tokens)[0], tiny_model(tokens)[0], 0.3, f"{weights} export against the fp32 model")


def test_official_file_without_layer0_value_tensors(tmp_path, tiny_model):
    sd = {k: v for k, v in tiny_model.state_dict().items()}
    torch.save(sd, tmp_path / "m.pth")  # our state dict has no blocks.0.att.v*: some official files neither
    assert rwkv_lm.load(tmp_path / "m.pth").config == tiny_model.config


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, this is not a model")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        rwkv_lm.load(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        rwkv_lm.load(tmp_path / "missing.pth")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_truncated_file(tmp_path, tiny_model, fmt):
    path = tmp_path / f"m.{fmt}"
    if fmt == "pth":
        rwkv_lm.export_official(tiny_model, path)
    else:
        rwkv_lm.save(tiny_model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        rwkv_lm.load(path)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd["payload"] = RunsCode()
    torch.save(sd, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        rwkv_lm.load(tmp_path / "evil.pth")


def test_missing_and_misshaped_tensors(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    del sd["blocks.1.att.key.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing tensor 'blocks.1.att.key.weight' \(expected shape \(64, 64\)\)"):
        rwkv_lm.load(tmp_path / "missing.pth")

    sd = dict(tiny_model.state_dict())
    sd["blocks.2.ffn.value.weight"] = torch.zeros(64, 128)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"'blocks.2.ffn.value.weight' has shape \(64, 128\), expected \(64, 256\)"):
        rwkv_lm.load(tmp_path / "shape.pth")

    sd = dict(tiny_model.state_dict())
    del sd["blocks.0.att.r_k"]
    torch.save(sd, tmp_path / "norwkv.pth")
    with pytest.raises(CheckpointError, match="missing tensor 'blocks.0.att.r_k'.*RWKV-7"):
        rwkv_lm.load(tmp_path / "norwkv.pth")


def test_safetensors_without_our_config(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="without an rwkv_lm config"):
        rwkv_lm.load(tmp_path / "plain.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"good")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [target]
