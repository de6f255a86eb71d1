"""GGUF and Hugging Face folders both ways, models by hub name, and `rwkv-lm convert` choosing the format:
round trips on random models of odd sizes and on the default model with its BPE tokenizer, the layouts
llama.cpp and fla expect, and a CheckpointError naming the file and the tensor for every bad file."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import rwkv_lm
from rwkv_lm import CheckpointError, RWKVConfig
from rwkv_lm.checkpoint import dequantize
from rwkv_lm.cli import main
from rwkv_lm.formats import gguf as gguf_format
from rwkv_lm.testing import random_model

from conftest import assert_close

DEFAULT_MODEL = Path(__file__).parent.parent / "demo" / "models" / "rwkv7.safetensors"
ODD = {  # sizes where a transposed or flattened tensor would show
    "tiny": RWKVConfig(vocab_size=101, n_layer=3, n_embd=64, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=12),
    "odd": RWKVConfig(vocab_size=97, n_layer=2, n_embd=96, head_size=32, dim_ffn=200, decay_lora=8, iclr_lora=16,
                      value_lora=8, gate_lora=24),
}


def logits(model, vocab_size, seed=5):
    tokens = torch.randint(0, vocab_size, (2, 23), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)[0]


@pytest.fixture(scope="module")
def default_model():
    return rwkv_lm.load(DEFAULT_MODEL, fast=False)


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("name", ODD)
def test_gguf_round_trip_f32(tmp_path, name):
    model = random_model(ODD[name], seed=3)
    path = rwkv_lm.export_gguf(model, tmp_path / "m.gguf", type="f32")
    loaded = rwkv_lm.load(path, fast=False)
    assert loaded.config == model.config and loaded.metadata["format"] == "gguf" and loaded.tokenizer is None
    assert gguf.GGUFReader(path).get_field("tokenizer.ggml.model").contents() == "none", "llama.cpp runs it on ids"
    assert_close(logits(loaded, model.config.vocab_size), logits(model, model.config.vocab_size), 1e-5, "gguf f32")
    assert_close(logits(rwkv_lm.load(path), model.config.vocab_size), logits(model, model.config.vocab_size), 1e-5,
                 "gguf f32, the CPU runtime")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"], "temporary files left behind"


def test_gguf_layout_is_llama_cpps(tmp_path):
    cfg = ODD["odd"]
    model = random_model(cfg, seed=4)
    reader = gguf.GGUFReader(rwkv_lm.export_gguf(model, tmp_path / "m.gguf", type="q8_0"))
    field = lambda key: reader.get_field(key.format(arch="rwkv7")).contents()
    assert field("general.architecture") == "rwkv7" and field(gguf.Keys.WKV.HEAD_SIZE) == 32
    assert (field(gguf.Keys.Attention.DECAY_LORA_RANK), field(gguf.Keys.Attention.ICLR_LORA_RANK),
            field(gguf.Keys.Attention.VALUE_RESIDUAL_MIX_LORA_RANK), field(gguf.Keys.Attention.GATE_LORA_RANK)) == (8, 16, 8, 24)
    assert field(gguf.Keys.LLM.FEED_FORWARD_LENGTH) == 200 and field(gguf.Keys.LLM.BLOCK_COUNT) == 2
    tensors = {t.name: t for t in reader.tensors}
    ne = lambda name: [int(n) for n in tensors[name].shape]  # llama.cpp's order: the fastest dimension first
    C = cfg.n_embd
    assert ne("blk.1.time_mix_lerp_fused.weight") == [C, 1, 1, 6]
    assert ne("blk.1.time_mix_w1.weight") == [C, 8] and ne("blk.1.time_mix_w2.weight") == [8, C]
    assert ne("blk.0.time_mix_v1.weight") == [C, 16], "layer 0's placeholder value LoRA has the iclr rank"
    assert ne("blk.1.time_mix_r_k.weight") == [C] and ne("blk.1.channel_mix_lerp_k.weight") == [C]
    assert ne("blk.1.channel_mix_key.weight") == [C, 200] and ne("token_embd.weight") == [C, 97]
    w1 = gguf.quants.dequantize(tensors["blk.1.time_mix_w1.weight"].data, tensors["blk.1.time_mix_w1.weight"].tensor_type)
    assert np.array_equal(w1, model.blocks[1].att.w1.detach().T.numpy()), "LoRA down stored [rank, C], in f32"
    Q8, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.time_mix_key.weight"].tensor_type == Q8 and tensors["blk.1.time_mix_a1.weight"].tensor_type == Q8
    assert tensors["blk.1.time_mix_w1.weight"].tensor_type == F32 and tensors["blk.1.attn_norm.weight"].tensor_type == F32


@pytest.mark.parametrize("type_, bound", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2), ("q4_0", 3e-1)])
def test_gguf_lower_precision_types_load_close(tmp_path, type_, bound):
    model = random_model(ODD["tiny"], seed=6)
    loaded = rwkv_lm.load(rwkv_lm.export_gguf(model, tmp_path / "m.gguf", type=type_), fast=False)
    assert_close(logits(loaded, 101), logits(model, 101), bound, f"gguf {type_}")


def test_gguf_default_model_with_its_bpe_tokenizer(tmp_path, default_model, monkeypatch):
    path = rwkv_lm.export_gguf(default_model, tmp_path / "m.gguf", type="f32")
    loaded = rwkv_lm.load(path, fast=False)
    assert_close(logits(loaded, 4096), logits(default_model, 4096), 1e-5, "default model via gguf")
    text = "The quick brown fox, 1234 — naïve café.\n\nNext"
    assert loaded.tokenizer.encode(text) == default_model.tokenizer.encode(text)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("tokenizer.ggml.tokens").contents()[:2] == ["<|endoftext|>", "!"]
    # a GGUF made by another tool has no copy of our spec: the BPE is rebuilt from llama.cpp's tokens and merges
    monkeypatch.setattr(gguf_format, "TOKENIZER_KEY", "absent.key")
    rebuilt = rwkv_lm.load(path, fast=False).tokenizer
    assert rebuilt.encode(text) == default_model.tokenizer.encode(text)
    assert rebuilt.decode(rebuilt.encode(text)) == text


def test_gguf_world_vocabulary(tmp_path, world, monkeypatch):
    cfg = RWKVConfig(vocab_size=65536, n_layer=1, n_embd=64, head_size=64, decay_lora=8, iclr_lora=8, value_lora=8, gate_lora=8)
    model = random_model(cfg)
    path = rwkv_lm.export_gguf(model, tmp_path / "w.gguf", tokenizer=world)
    reader = gguf.GGUFReader(path)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert reader.get_field("tokenizer.ggml.model").contents() == "rwkv" and len(tokens) == 65536
    assert tokens[0] == "<s>" and tokens[world.encode("\n\n")[0]] == "\\n\\n" and tokens[-1] == "[PAD65535]"
    monkeypatch.setattr(gguf_format, "TOKENIZER_KEY", "absent.key")
    assert rwkv_lm.load(path).tokenizer.spec == "world", "llama.cpp's rwkv vocabulary reads back as World"


def test_gguf_refuses_a_tokenizer_llama_cpp_cannot_hold(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from rwkv_lm.tokenizer import BPETokenizer

    hf = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(CheckpointError, match="byte-level BPE"):
        rwkv_lm.export_gguf(random_model(ODD["tiny"]), tmp_path / "m.gguf", tokenizer=BPETokenizer(hf))
    assert not (tmp_path / "m.gguf").exists()


def test_bad_gguf_files_name_the_file_and_the_tensor(tmp_path):
    model = random_model(ODD["tiny"])
    path = rwkv_lm.export_gguf(model, tmp_path / "m.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor 'blk\.2\.channel_mix_value\.weight' runs past the end"):
        rwkv_lm.load(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match=r"head\.gguf: cannot be read as GGUF"):
        rwkv_lm.load(head)

    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"llama\.gguf: a GGUF file of architecture 'llama'"):
        rwkv_lm.load(tmp_path / "llama.gguf")

    writer = gguf.GGUFWriter(tmp_path / "holey.gguf", "rwkv7")
    reader = gguf.GGUFReader(path)
    # a file with every key but one tensor left out
    for key in ("embedding_length", "block_count", "feed_forward_length", "wkv.head_size", "attention.decay_lora_rank",
                "attention.iclr_lora_rank", "attention.value_residual_mix_lora_rank", "attention.gate_lora_rank"):
        writer.add_uint32(f"rwkv7.{key}", int(reader.get_field(f"rwkv7.{key}").contents()))
    for t in reader.tensors:
        if t.name != "blk.1.time_mix_k_a.weight":
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match=r"holey\.gguf: missing tensor 'blk\.1\.time_mix_k_a\.weight'"):
        rwkv_lm.load(tmp_path / "holey.gguf")


def test_int8_model_exports_its_dequantized_weights(tmp_path):
    from rwkv_lm.runtime.cpu import optimize

    int8 = optimize(random_model(ODD["tiny"], seed=9), weights="int8")  # int8 weights with per-row scales
    # model.py with the dequantized weights (the int8 model itself may round its activations: x86 from avx2)
    plain = random_model(ODD["tiny"], seed=0)
    plain.load_state_dict(dequantize(int8.state_dict(), "the int8 model"))
    expected = logits(plain, 101)
    for path in (rwkv_lm.export_gguf(int8, tmp_path / "m.gguf"), rwkv_lm.export_hf(int8, tmp_path / "hf")):
        assert_close(logits(rwkv_lm.load(path, fast=False), 101), expected, 1e-5, str(path))


# ---------------------------------------------------------------- Hugging Face folders

@pytest.mark.parametrize("name", ODD)
def test_hf_round_trip(tmp_path, name):
    model = random_model(ODD[name], seed=8)
    folder = rwkv_lm.export_hf(model, tmp_path / "hf")
    loaded = rwkv_lm.load(folder, fast=False)
    assert loaded.config == model.config and loaded.metadata["format"] == "hf"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert torch.equal(logits(loaded, model.config.vocab_size), logits(model, model.config.vocab_size))


def test_hf_layout_is_fla_hubs(tmp_path, default_model):
    folder = rwkv_lm.export_hf(default_model, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["RWKV7ForCausalLM"] and config["model_type"] == "rwkv7"
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"], config["intermediate_size"],
            config["decay_low_rank_dim"], config["a_low_rank_dim"], config["v_low_rank_dim"],
            config["gate_low_rank_dim"], config["vocab_size"]) == (128, 4, 64, 512, 32, 32, 32, 64, 4096)
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    att = default_model.blocks[1].att
    assert torch.equal(sd["model.layers.1.attn.w_lora.lora.0.weight"], att.w1.T)  # [rank, C]: an nn.Linear's weight
    assert torch.equal(sd["model.layers.1.attn.w_lora.lora.2.weight"], att.w2.T)
    assert torch.equal(sd["model.layers.1.attn.w_lora.lora.2.bias"], att.w0.reshape(-1))
    assert "model.layers.1.attn.g_lora.lora.2.bias" not in sd and "model.layers.0.attn.v_lora.lora.0.weight" not in sd
    assert sd["model.layers.1.attn.r_k"].shape == (2, 64) and sd["model.layers.1.attn.k_k"].shape == (128,)
    assert "model.layers.0.pre_norm.weight" in sd and "lm_head.weight" in sd
    loaded = rwkv_lm.load(folder, fast=False)
    assert torch.equal(logits(loaded, 4096), logits(default_model, 4096))
    assert loaded.tokenizer.spec == default_model.tokenizer.spec


def test_hf_world_folder_carries_the_vocabulary_file(tmp_path, world):
    cfg = RWKVConfig(vocab_size=65536, n_layer=1, n_embd=64, head_size=64, decay_lora=8, iclr_lora=8, value_lora=8, gate_lora=8)
    folder = rwkv_lm.export_hf(random_model(cfg), tmp_path / "hf", tokenizer=world)
    assert (folder / "rwkv_vocab_v20230424.txt").is_file()
    assert rwkv_lm.load(folder).tokenizer.spec == "world"


def test_bad_hf_folders_name_the_file_and_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = rwkv_lm.export_hf(random_model(ODD["tiny"]), tmp_path / "hf")
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.2.attn.a_lora.lora.2.bias"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"hf: missing tensor 'model\.layers\.2\.attn\.a_lora\.lora\.2\.bias'"):
        rwkv_lm.load(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated or corrupt"):
        rwkv_lm.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="a folder without config.json"):
        rwkv_lm.load(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not fla's RWKV-7"):
        rwkv_lm.load(folder)


# ---------------------------------------------------------------- hub names

def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face cache holding `files` of `repo` at one commit, laid out as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, src in files.items():
        dst = repo_dir / "snapshots" / commit / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, default_model):
    """A hub cache with the default model as a file and as an fla-hub folder, and huggingface_hub offline."""
    import huggingface_hub.constants

    hf = rwkv_lm.export_hf(default_model, tmp_path / "hf")
    files = {"rwkv7.safetensors": DEFAULT_MODEL, **{f"hf/{p.name}": p for p in hf.iterdir()}}
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-rwkv", files)
    files = {p.name: p for p in hf.iterdir()}
    _hub_cache(cache, "someone/tiny-rwkv-hf", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_names_load_from_the_cache(offline_hub, default_model):
    expected = logits(default_model, 4096)
    for name in ("hf:someone/tiny-rwkv/rwkv7.safetensors", "hf:someone/tiny-rwkv@main/rwkv7.safetensors",
                 "hf:someone/tiny-rwkv/hf", "hf:someone/tiny-rwkv-hf"):
        model = rwkv_lm.load(name, fast=False)
        assert torch.equal(logits(model, 4096), expected), name
        assert model.tokenizer is not None
    # argparse's type=Path (the demo) keeps the name; the trainer's data.tokenizer takes one too
    assert torch.equal(logits(rwkv_lm.load(Path("hf:someone/tiny-rwkv/rwkv7.safetensors"), fast=False), 4096), expected)
    from train.data import resolve_tokenizer

    tokenizer = resolve_tokenizer("hf:someone/tiny-rwkv-hf", 0, offline_hub)
    assert tokenizer.spec == default_model.tokenizer.spec


def test_hub_name_errors_name_the_repo(offline_hub):
    with pytest.raises(CheckpointError, match=r"hf:someone/tiny-rwkv/nope\.gguf: the file 'nope\.gguf' of someone/tiny-rwkv "
                                              "is not in the Hugging Face cache"):
        rwkv_lm.load("hf:someone/tiny-rwkv/nope.gguf")
    with pytest.raises(CheckpointError, match="someone/absent"):
        rwkv_lm.load("hf:someone/absent/model.safetensors")
    with pytest.raises(CheckpointError, match="a hub name is hf:OWNER/REPO/FILE"):
        rwkv_lm.load("hf:just-a-name")


def test_hub_name_in_the_cli_offline(offline_hub, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(offline_hub), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(rwkv_lm.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    run = lambda model: subprocess.run([sys.executable, "-m", "rwkv_lm.cli", "generate", "--model", model, "--prompt",
                                        "Once upon a time", "--max-tokens", "8", "--temperature", "0"],
                                       env=env, capture_output=True, text=True, timeout=300)
    by_name, by_path = run("hf:someone/tiny-rwkv/rwkv7.safetensors"), run(str(DEFAULT_MODEL))
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == by_path.stdout and by_name.stdout.strip()
    missing = run("hf:someone/tiny-rwkv/other.safetensors")
    assert missing.returncode == 2 and "someone/tiny-rwkv" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------------------------- rwkv-lm convert

def test_convert_picks_the_format_from_the_name(tmp_path, capsys):
    model = random_model(ODD["tiny"], seed=2)
    src = rwkv_lm.save(model, tmp_path / "m.safetensors")
    expected = logits(model, 101)
    assert main(["convert", str(src), str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    assert_close(logits(rwkv_lm.load(tmp_path / "m.gguf", fast=False), 101), expected, 1e-5, "convert to gguf")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out") + "/"]) == 0
    assert torch.equal(logits(rwkv_lm.load(tmp_path / "out", fast=False), 101), expected)
    assert main(["convert", str(src), str(tmp_path / "model.bin"), "--format", "hf"]) == 0
    assert (tmp_path / "model.bin" / "config.json").is_file()
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "m.bin")]) == 2
    assert "m.bin: cannot tell which format to write" in capsys.readouterr().err
    assert not (tmp_path / "m.bin").exists()
