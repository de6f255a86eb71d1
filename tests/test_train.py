import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_lm
from train.__main__ import main
from train.module import LanguageModel, param_groups, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "train/configs/tiny.yaml")
SHORT = ["--trainer.max_steps", "8", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
         "--data.ctx_len", "32", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # the tiny BPE is trained once for the whole module


def fit(root, cache, *extra):
    return main(["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--data.cache_dir", cache, *extra])


def losses(root) -> dict[int, float]:
    """step -> training loss, from the CSV logs of every run in `root` (a resumed run logs to a new version)."""
    out = {}
    for path in sorted(Path(root).glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("loss"):
                out[int(row["step"])] = float(row["loss"])
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("tiny")
    assert fit(root, cache, "--trainer.enable_progress_bar", "false") == 0
    return root


def test_tiny_config_trains_and_loss_falls(tiny_run):
    history = losses(tiny_run)
    steps = sorted(history)
    assert steps[-1] == 59
    assert history[steps[-1]] < history[steps[0]] - 1.0, history
    assert torch.load(tiny_run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 60  # the final step
    assert list(tiny_run.glob("logs/version_0/events.out.tfevents.*")), "no TensorBoard log"


def test_export_loads_and_generates(tiny_run, tmp_path):
    ckpt = str(tiny_run / "checkpoints/last.ckpt")
    assert main(["export", ckpt, str(tmp_path / "m.safetensors")]) == 0
    assert main(["export", ckpt, str(tmp_path / "m.pth")]) == 0
    model = rwkv_lm.load(tmp_path / "m.safetensors")
    assert model.tokenizer is not None and model.config.vocab_size == model.tokenizer.vocab_size
    text = rwkv_lm.complete(model, model.tokenizer, "KING HENRY:", max_tokens=8, temperature=0)
    assert text and text == rwkv_lm.complete(model, model.tokenizer, "KING HENRY:", max_tokens=8, temperature=0)
    official = rwkv_lm.load(tmp_path / "m.pth")  # bf16 weights
    x = torch.tensor([model.tokenizer.encode("KING HENRY:")])
    assert (official(x)[0] - model(x)[0]).abs().max() < 0.1


def test_gpt_trains_and_exports(tmp_path, cache):
    root = tmp_path / "gpt"
    assert fit(root, cache, *SHORT, "--model.arch", "gpt", "--model.config", "{n_layer: 2, n_embd: 64, n_head: 2}",
               "--model.l2wrap", "false") == 0
    assert main(["export", str(root / "checkpoints/last.ckpt"), str(tmp_path / "gpt.safetensors")]) == 0
    model = rwkv_lm.load(tmp_path / "gpt.safetensors")
    assert isinstance(model, rwkv_lm.GPT)
    logits, state = model.step(torch.tensor([1]), model.init_state(1))
    assert logits.shape == (1, model.config.vocab_size) and state.nbytes > 0


def test_nan_stops_training_keeps_last_good_checkpoint_and_resume_reproduces(tmp_path, cache, monkeypatch, capsys):
    every = ["--checkpoint.every_n_train_steps", "4"]
    assert fit(tmp_path / "whole", cache, *SHORT, *every) == 0
    whole = losses(tmp_path / "whole")

    real_loss = LanguageModel._loss

    def nan_from_step_6(self, batch, **kwargs):
        loss = real_loss(self, batch, **kwargs)
        return loss * math.nan if self.global_step >= 6 else loss

    monkeypatch.setattr(LanguageModel, "_loss", nan_from_step_6)
    assert fit(tmp_path / "broken", cache, *SHORT, *every) == 1
    assert "loss became nan at step 6" in capsys.readouterr().err
    assert torch.load(tmp_path / "broken/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    monkeypatch.setattr(LanguageModel, "_loss", real_loss)

    assert fit(tmp_path / "broken", cache, *SHORT, *every, "--ckpt_path", "last") == 0
    resumed = losses(tmp_path / "broken")
    assert sorted(resumed) == list(range(8))
    for step in range(8):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), step


def test_ddp_two_processes_match_one_with_the_same_global_batch(tmp_path, cache):
    assert fit(tmp_path / "one", cache, *SHORT, "--trainer.max_steps", "4") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "train", "fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "two"),
           "--data.cache_dir", cache, *SHORT, "--trainer.max_steps", "4", "--trainer.strategy", "ddp",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.batch_size", "2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def test_two_nodes_match_one_process_with_the_same_global_batch(tmp_path, cache):
    """`--trainer.num_nodes 2 --trainer.devices 1` as two processes on this machine, as train/README.md runs
    two machines (NODE_RANK, MASTER_ADDR, MASTER_PORT), gloo over loopback."""
    import socket

    assert fit(tmp_path / "one", cache, *SHORT, "--trainer.max_steps", "4") == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "train", "fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "two"),
           "--data.cache_dir", cache, *SHORT, "--trainer.max_steps", "4", "--trainer.strategy", "ddp",
           "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2", "--trainer.devices", "1", "--data.batch_size", "2"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "NODE_RANK": str(rank)})
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def test_bad_input_gets_a_message_not_a_traceback(tmp_path, cache, capsys):
    assert fit(tmp_path / "a", cache, *SHORT, "--data.train", f"[{tmp_path / 'nope.txt'}]") == 1
    assert "nope.txt: no such file" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("To be, or not to be")
    assert fit(tmp_path / "b", cache, *SHORT, "--data.train", f"[{tmp_path / 'short.txt'}]") == 1
    assert "fewer than one window" in capsys.readouterr().err
    assert fit(tmp_path / "c", cache, *SHORT, "--model.config", "{n_layers: 2}") == 1
    assert "model.config does not fit arch 'rwkv7'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit(tmp_path / "c", cache, *SHORT, "--model.bogus", "1")
    assert "bogus" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.ckpt"), str(tmp_path / "x.safetensors")]) == 1
    assert "none.ckpt: no such file" in capsys.readouterr().err


def test_a_fine_tune_without_its_base_model_says_how_to_make_it_or_what_to_start_from(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/default_rwkv7/base.safetensors
    sft = str(REPO / "train/configs/sft_rwkv7.yaml")
    assert main(["fit", "--config", sft, *SHORT]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "runs/default_rwkv7/base.safetensors: no such" in err and "pre-train it first" in err
    assert "--model.init_from demo/models/rwkv7.safetensors --data.tokenizer demo/models/rwkv7.safetensors" in err
    assert main(["fit", "--config", sft, *SHORT, "--data.tokenizer", str(REPO / "demo/models/rwkv7.safetensors")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "model.init_from runs/default_rwkv7/base.safetensors: no such file; pre-train it first" in err


def test_the_progress_bar_of_a_run_bounded_by_steps_counts_no_negative_epochs():
    from types import SimpleNamespace

    from train.cli import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # what Lightning sets when max_steps bounds the run
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(0).strip() == "Epoch 0/2"


def test_optimizer_groups_and_schedule():
    model = rwkv_lm.RWKV(rwkv_lm.RWKVConfig(vocab_size=50, n_layer=2, n_embd=64, head_size=32))
    groups = {(g["weight_decay"], g["lr"]): g["params"] for g in param_groups(model, 0.1, 1e-3)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[(0.0, 2e-3)]} == {"blocks.0.att.w0", "blocks.1.att.w0"}
    decayed = {names[id(p)] for p in groups[(0.1, 1e-3)]}
    assert "blocks.0.att.key.weight" in decayed and "emb.weight" in decayed
    assert not any(n.endswith(("ln1.weight", "att.w1", "x_r")) for n in decayed)  # 1-D and LoRA matrices stay undecayed
    assert sum(len(ps) for ps in groups.values()) == len(list(model.parameters()))
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["tiny", "default_rwkv7", "default_gpt", "sft_rwkv7", "sft_gpt", "persona_rwkv7"])
def test_every_shipped_config_parses(name, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / f"train/configs/{name}.yaml"), "--print_config"])
    assert done.value.code == 0 and "max_steps" in capsys.readouterr().out


def test_checkpoint_write_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from train.cli import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash_halfway(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_l2wrap_leaves_the_loss_and_pushes_down_each_top_logit():
    from train.module import L2Wrap

    logits = torch.tensor([[[1.0, 3.0, -2.0], [0.5, -1.0, 0.2]]], requires_grad=True)
    loss = logits.logsumexp(-1).mean()
    wrapped = L2Wrap.apply(loss, logits, 0.01)
    assert wrapped.item() == loss.item()
    wrapped.backward()
    plain = torch.autograd.grad(logits.logsumexp(-1).mean(), logits)[0]
    extra = logits.grad - plain
    assert torch.allclose(extra, torch.tensor([[[0.0, 0.03, 0.0], [0.005, 0.0, 0.0]]]))
