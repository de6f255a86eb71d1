"""`rwkv-lm`: greedy text equal to the official `rwkv` package's, conversion both ways, one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

import rwkv_lm
from rwkv_lm import RWKVConfig
from rwkv_lm.cli import main
from rwkv_lm.testing import random_model


# The official runtime reads RWKV_V7_ON when rwkv.model is imported, so it runs in its own process.
OFFICIAL_GREEDY = r"""
import json, os, sys
os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "0"  # scripting costs seconds and changes no number
from rwkv.model import RWKV
from rwkv.utils import PIPELINE
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
out, state = model.forward(pipeline.encode(prompt), None)
tokens = []
for _ in range(n):
    tokens.append(int(out.argmax()))
    out, state = model.forward([tokens[-1]], state)
text = b"".join(pipeline.tokenizer.idx2token[t] for t in tokens).decode("utf-8", errors="replace")
print(json.dumps({"tokens": tokens, "text": text}))
"""


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=64, head_size=64, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return rwkv_lm.export_official(random_model(cfg, seed=11), tmp_path_factory.mktemp("cli") / "tiny-world.pth", dtype=torch.float32)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_generate_equals_rwkv_pip(official_pth, capsys):
    pytest.importorskip("rwkv", reason="the rwkv pip package is a test dependency")
    prompt = "The Eiffel tower is in 巴黎, and"
    ref = subprocess.run([sys.executable, "-c", OFFICIAL_GREEDY, str(official_pth), prompt, "40"],
                         capture_output=True, text=True, check=True)
    expected = json.loads(ref.stdout.strip().splitlines()[-1])
    assert 0 not in expected["tokens"], "the oracle ran into an end of document; pick another seed"
    code, out, err = run(capsys, "generate", "--model", official_pth, "--prompt", prompt, "--max-tokens", 40, "--temperature", 0)
    assert code == 0, err
    assert out == expected["text"] + "\n"


def test_convert_both_ways(official_pth, tmp_path, capsys):
    ours = tmp_path / "m.safetensors"
    assert run(capsys, "convert", official_pth, ours, "--dtype", "fp32")[0] == 0
    back = tmp_path / "back.pth"
    assert run(capsys, "convert", ours, back, "--dtype", "fp32")[0] == 0
    original, converted = torch.load(official_pth, weights_only=True), torch.load(back, weights_only=True)
    assert original.keys() == converted.keys() and all(torch.equal(original[k], converted[k]) for k in original)
    assert rwkv_lm.load(ours).tokenizer.spec == "world", "the World tokenizer travels with the converted file"


def test_convert_says_where_the_tokenizer_went_and_a_model_file_is_a_tokenizer_source(tmp_path, capsys):
    from rwkv_lm.tokenizer import train_bpe

    tok = train_bpe(["the goose flies over the lake at dawn"] * 20, vocab_size=300)
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    ours = rwkv_lm.save(random_model(cfg), tmp_path / "m.safetensors", tokenizer=tok.spec)
    code, out, _ = run(capsys, "convert", ours, tmp_path / "m.pth")
    assert code == 0 and f"tokenizer: not in {tmp_path / 'm.pth'}" in out and f"--tokenizer {ours}" in out
    code, out, err = run(capsys, "generate", "--model", tmp_path / "m.pth", "--tokenizer", ours, "--prompt", "the goose",
                         "--max-tokens", 4, "--temperature", 0)
    assert code == 0, err
    code, out, _ = run(capsys, "convert", tmp_path / "m.pth", tmp_path / "none.safetensors")
    assert code == 0 and "tokenizer: none" in out


def test_a_trainer_checkpoint_given_as_a_model_or_state_names_the_export_command(tmp_path, tiny_model, capsys):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "pytorch-lightning_version": "2.6", "rwkv_lm": {}}, ckpt)
    for argv in (["generate", "--model", ckpt, "--prompt", "x"],
                 ["generate", "--model", "demo/models/rwkv7.safetensors", "--state", ckpt, "--prompt", "x"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "a training checkpoint" in err and f"python -m train export {ckpt} OUT.safetensors" in err


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_generate_with_sampling_options(official_pth, capsys, dtype):
    argv = ["generate", "--model", official_pth, "--prompt", "Hi", "--max-tokens", 8, "--temperature", 0.7,
            "--top-p", 0.9, "--top-k", 50, "--seed", 3, "--presence-penalty", 0.2, "--dtype", dtype]
    first, second = run(capsys, *argv), run(capsys, *argv)
    assert first[0] == 0 and first == second and first[1].strip()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "{pth}", "--prompt", "", "--max-tokens", "5"], "--prompt is empty"),
    (["generate", "--model", "{pth}", "--prompt", "Hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--model", "{pth}", "--prompt", "Hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "--model", "{pth}", "--prompt", "Hi", "--top-k", "-2"], "top_k must be an integer >= 0"),
    (["generate", "--model", "{pth}", "--prompt", "Hi", "--max-tokens", "many"], "invalid int value: 'many'"),
    (["generate", "--model", "/no/such/file.pth", "--prompt", "Hi"], "no such file"),
    (["generate", "--model", "{tiny}", "--prompt", "Hi"], "names no tokenizer; pass --tokenizer"),
    (["generate", "--model", "{tiny}", "--prompt", "Hi", "--tokenizer", "world"], "tokenizer has 65530 tokens but the model only 101"),
    (["generate", "--model", "{tiny}", "--prompt", "Hi", "--tokenizer", "/no/tok.json"], "no such file"),
    (["generate", "--prompt", "Hi"], "the following arguments are required: --model"),
    (["fly"], "invalid choice: 'fly'"),
    (["generate", "--model", "{pth}", "--prompt", "Hi", "--device", "gpu0"], "is not a device; use cpu or cuda"),
    (["generate", "--model", "{pth}", "--prompt", "Hi", "--device", "mps"], "only cpu and cuda are supported"),
    (["generate", "--model", "{pth}", "--prompt", "Hi", "--dtype", "int2"], "invalid choice: 'int2'"),
    pytest.param(["generate", "--model", "{pth}", "--prompt", "Hi", "--device", "cuda"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")),
])
def test_bad_input_is_one_line_and_exit_2(official_pth, tmp_path, tiny_model, capsys, argv, message):
    tiny = rwkv_lm.save(tiny_model, tmp_path / "tiny.safetensors")
    argv = [a.format(pth=official_pth, tiny=tiny) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("rwkv-lm: error: ") and err.count("\n") == 1 and message in err, err


def test_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rwkv_lm.cli", "generate", "--model", str(tmp_path / "x.pth"), "--prompt", "Hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no such file" in proc.stderr


def test_the_cli_and_server_start_without_torch_compile():
    """torch._dynamo (torch.compile's machinery) takes ~2.4 s to import, and nothing the CLI, the server or the
    engine runs uses it: a dependency's module that pulls it in (llguidance.torch did) makes every start slower."""
    code = "import sys, rwkv_lm.cli, rwkv_lm.serve.server; print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_chat_in_the_terminal(official_pth, tmp_path, monkeypatch, capsys):
    lines = iter(["Hello there", "/save " + str(tmp_path / "c.safetensors"), "/reset", "/load " + str(tmp_path / "c.safetensors"), "/quit"])
    monkeypatch.setattr("rich.console.Console.input", lambda self, *a, **k: next(lines))
    code, out, err = run(capsys, "chat", "--model", official_pth, "--max-tokens", 5, "--temperature", 0)
    assert code == 0, err
    assert "Assistant:" in out and "saved" in out and (tmp_path / "c.safetensors").is_file()
